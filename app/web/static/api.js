// Calls to the service's own endpoints (same origin), with the API key from sessionStorage and errors
// read from the service's problem JSON (or the protocol's {"error"}).

const KEY_STORAGE = "vae-service-api-key";

export class ApiError extends Error {
  constructor(status, title, detail) {
    super(`${status} ${title}: ${detail}`);
    this.status = status;
    this.title = title;
    this.detail = detail;
  }
}

export function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
}

// One request. `json` is sent as JSON, `form` as multipart; `accept` "image/png" answers a Blob, else JSON.
export async function call(path, { method = "GET", json, form, accept = "application/json" } = {}) {
  const headers = { Accept: accept };
  const key = apiKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form !== undefined) {
    body = form;
  }
  const response = await fetch(path, { method, headers, body });
  if (!response.ok) {
    let title = response.statusText || "Error";
    let detail = "";
    try {
      const problem = await response.json();
      title = problem.title || title;
      detail = problem.detail || problem.error || "";
    } catch {
      detail = "the service sent no explanation";
    }
    throw new ApiError(response.status, title, detail);
  }
  return accept.startsWith("image/") ? response.blob() : response.json();
}

// A PNG Blob of an image file or a canvas, for multipart uploads.
export function canvasBlob(canvas) {
  return new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
}
