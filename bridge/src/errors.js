// Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
//
// Every failure the bridge knows about is an ApiError; anything else becomes a 500 with a
// generic message (the stack goes nowhere: not to the client, not to the logs).
//
// Every error reply carries `x-should-retry: false`, which stops the OpenAI SDKs' automatic
// retries: a retried speech request starts another GPU job, and no error the bridge answers is
// fixed by asking again at once. The one exception is `retryable` errors: RunPod refused to start
// the job (HTTP 429), so no job exists and a retry after `Retry-After` is what RunPod asks for.

export class ApiError extends Error {
  constructor(status, message, { type, param = null, code = null, headers = {}, retryable = false } = {}) {
    super(message);
    this.status = status;
    this.type = type || defaultType(status);
    this.param = param;
    this.code = code;
    this.headers = headers;
    this.retryable = retryable;
  }

  toJSON() {
    return { error: { message: this.message, type: this.type, param: this.param, code: this.code } };
  }
}

function defaultType(status) {
  if (status === 401) return "authentication_error";
  if (status >= 500) return "server_error";
  return "invalid_request_error";
}

export const invalid = (message, param = null, code = null) => new ApiError(400, message, { param, code });

export const notFound = (message, param = null, code = "not_found") => new ApiError(404, message, { param, code });

export const tooLarge = (message, param = null) => new ApiError(413, message, { param, code: "request_too_large" });

export const upstreamFailed = (message, code = "upstream_error") => new ApiError(502, message, { code });

export const upstreamTimeout = (message) => new ApiError(504, message, { code: "upstream_timeout" });

// RunPod's rate limit, passed on with its Retry-After (seconds).
export const rateLimited = (message, retryAfterSeconds, retryable) =>
  new ApiError(429, message, {
    type: "requests",
    code: "rate_limit_exceeded",
    headers: { "retry-after": String(retryAfterSeconds) },
    retryable,
  });

export function errorResponse(error, extraHeaders = {}) {
  const known = error instanceof ApiError;
  const apiError = known
    ? error
    : new ApiError(500, "The bridge failed unexpectedly; the request was not completed.", { code: "internal_error" });
  if (!known) {
    // The error's name only: messages of unexpected errors may quote request data.
    console.error(`bridge: unexpected ${error?.name || typeof error}`);
  }
  const headers = { "content-type": "application/json", ...apiError.headers, ...extraHeaders };
  if (!apiError.retryable) headers["x-should-retry"] = "false";
  return new Response(JSON.stringify(apiError.toJSON()), { status: apiError.status, headers });
}
