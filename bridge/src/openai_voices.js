// OpenAI's voice names, mapped to the reference voices every deployment fetches on its first boot
// (demo/voices.json), so an OpenAI client works unchanged: most send `alloy` unless told otherwise.
//
// The operator's voices.json overrides any of them (an id there wins, in any case). With PRESET_VOICES
// set, a name is offered only when its preset is among them. OPENAI_VOICES=false turns the map off.

// OpenAI's name -> the preset it speaks with (a file stem of demo/voices.json)
export const OPENAI_VOICES = {
  alloy: "en-Alice_woman",
  ash: "en-Carter_man",
  ballad: "in-Samuel_man",
  coral: "en-Maya_woman",
  echo: "en-Frank_man",
  fable: "in-Samuel_man",
  nova: "en-Maya_woman",
  onyx: "en-Frank_man",
  sage: "en-Alice_woman",
  shimmer: "en-Maya_woman",
  verse: "en-Carter_man",
  marin: "en-Alice_woman",
  cedar: "en-Carter_man",
};

// The voices of `voices` (voices.json's, validated), then the OpenAI names it does not define, each as
// {name: "Alloy (Alice)", preset, builtIn: true}; `offered(preset)` says whether the endpoint has it.
export function withOpenAiVoices(voices, config, offered) {
  if (!config.OPENAI_VOICES) return voices;
  const defined = new Set([...voices.keys()].map((id) => id.toLowerCase()));
  const merged = new Map(voices);
  for (const [id, preset] of Object.entries(OPENAI_VOICES)) {
    if (defined.has(id) || !offered(preset)) continue;
    merged.set(id, { name: `${capitalised(id)} (${shortName(preset)})`, preset, builtIn: true });
  }
  return merged;
}

function capitalised(text) {
  return text.charAt(0).toUpperCase() + text.slice(1);
}

// "Alice" for en-Alice_woman, as VibeVoice's file names go.
function shortName(preset) {
  return /^[a-z]{2,3}-([^_]+)_/i.exec(preset)?.[1] ?? preset;
}
