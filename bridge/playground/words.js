// Word highlighting, when the bridge returns word timings.
//
// The bridge answers `"timestamps": true` with JSON: the audio as base64 and Kokoro-style
// `timestamps: [{word, start_time, end_time, speaker}]` in the audio's timeline. The worker's own
// shape, `words: [{word, start_sec, end_sec, speaker}]`, is read too (stream events may carry it).
// A reply without either leaves the page as it is.

// The words of a reply or event, normalised to {word, start, end, speaker}, or null when none.
export function wordsOf(payload) {
  const list = Array.isArray(payload?.words) ? payload.words : payload?.timestamps;
  if (!Array.isArray(list)) return null;
  const words = [];
  for (const entry of list) {
    const start = Number(entry?.start_sec ?? entry?.start_time ?? entry?.start);
    const end = Number(entry?.end_sec ?? entry?.end_time ?? entry?.end);
    if (typeof entry?.word !== "string" || !Number.isFinite(start) || !Number.isFinite(end)) continue;
    words.push({ word: entry.word, start, end, speaker: entry.speaker ?? null });
  }
  return words;
}

// Shows the words in `container` and marks the one being spoken as `audio` plays. Clicking a
// word plays from there.
export class Highlighter {
  constructor(container, audio) {
    this.container = container;
    this.audio = audio;
    this.spans = [];
    this.words = [];
    this.current = -1;
    const update = () => this.update();
    audio.addEventListener("timeupdate", update);
    audio.addEventListener("seeked", update);
    audio.addEventListener("playing", () => this.follow());
  }

  show(words) {
    this.clear();
    this.words = words;
    // Speaker labels only for scripts: plain text has one speaker.
    const labelled = new Set(words.map((entry) => entry.speaker)).size > 1;
    let speaker = null;
    for (const [index, entry] of words.entries()) {
      if (labelled && entry.speaker !== speaker) {
        speaker = entry.speaker;
        const label = document.createElement("strong");
        label.className = "speaker";
        label.textContent = `${speaker}:`;
        this.container.append(document.createElement("br"), label, " ");
      }
      const span = document.createElement("span");
      span.className = "word";
      span.textContent = entry.word;
      span.dataset.start = String(entry.start);
      span.addEventListener("click", () => {
        this.audio.currentTime = entry.start;
        this.audio.play().catch(() => {});
      });
      this.spans[index] = span;
      this.container.append(span, " ");
    }
    this.container.querySelector("br")?.remove();
    this.container.hidden = words.length === 0;
  }

  clear() {
    this.container.replaceChildren();
    this.container.hidden = true;
    this.spans = [];
    this.words = [];
    this.current = -1;
  }

  // Per animation frame while playing: timeupdate alone fires only every ~250 ms.
  follow() {
    if (this.audio.paused || !this.words.length) return;
    this.update();
    requestAnimationFrame(() => this.follow());
  }

  update() {
    const time = this.audio.currentTime;
    const index = this.words.findIndex((entry) => time >= entry.start && time < entry.end);
    if (index === this.current) return;
    this.spans[this.current]?.classList.remove("current");
    this.spans[this.current]?.removeAttribute("aria-current");
    this.current = index;
    this.spans[index]?.classList.add("current");
    this.spans[index]?.setAttribute("aria-current", "true");
  }
}
