// The bridge's HTTP API as this page uses it: the token, JSON and multipart calls, errors in the
// bridge's own words, and the three shapes a speech reply can take (events, raw audio, JSON).

const TOKEN_KEY = "vibevoice-playground-token";

export class ApiError extends Error {
  constructor(message, status = 0) {
    super(message);
    this.status = status;
  }
}

// The token lives in this tab only (sessionStorage): it is gone when the tab closes.
export const token = {
  get: () => sessionStorage.getItem(TOKEN_KEY) || "",
  set: (value) => sessionStorage.setItem(TOKEN_KEY, value),
  clear: () => sessionStorage.removeItem(TOKEN_KEY),
};

// Called on every 401, so the page can ask for the token again.
let unauthorized = () => {};
export function onUnauthorized(callback) {
  unauthorized = callback;
}

// GET /health: public, says whether a token is needed.
export async function health() {
  const response = await send("/health", {});
  if (!response.ok) throw await errorOf(response); // a broken setting, in the bridge's words
  return response.json();
}

// Any API call; `json` or `form` is the body. Resolves to the Response when it is 2xx and
// throws ApiError with the bridge's sentence otherwise.
export async function call(path, { method = "GET", json, form, signal } = {}) {
  const headers = {};
  const secret = token.get();
  if (secret) headers.authorization = `Bearer ${secret}`;
  let body;
  if (json !== undefined) {
    headers["content-type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form !== undefined) {
    body = form; // the browser writes the multipart boundary
  }
  const response = await send(path, { method, headers, body, signal });
  if (response.status === 401) {
    const error = await errorOf(response);
    unauthorized(error.message);
    throw error;
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

async function send(path, init) {
  try {
    return await fetch(path, { ...init, cache: "no-store" });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError("The bridge could not be reached; check that it is running and try again.");
  }
}

// OpenAI's error shape, {"error": {"message"}}; anything else gets a sentence with the status.
export async function errorOf(response) {
  let message = "";
  try {
    message = (await response.json())?.error?.message || "";
  } catch {
    // not JSON: a proxy's page, say
  }
  return new ApiError(
    message || `The bridge answered HTTP ${response.status} without an explanation.`,
    response.status,
  );
}

// The `data:` payloads of a server-sent event stream, parsed as JSON, as they arrive.
// `event:` and comment lines are skipped: every payload carries its own "type".
export async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { done, value } = await read(reader);
    if (value) buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data) yield JSON.parse(data);
    }
    if (done) return;
  }
}

// The raw body, chunk by chunk.
export async function* chunks(response) {
  const reader = response.body.getReader();
  for (;;) {
    const { done, value } = await read(reader);
    if (done) return;
    if (value?.byteLength) yield value;
  }
}

// A body that breaks off mid-way (the bridge's signal that a raw audio stream failed).
async function read(reader) {
  try {
    return await reader.read();
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError("The connection to the bridge broke off before the audio was complete.");
  }
}

export function fromBase64(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}
