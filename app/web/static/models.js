// The models the service holds (GET /models), the model picker, and the routes of one model.
import { ApiError, call } from "./api.js";

// GET /models, or null from a service that serves one model and has no such endpoint.
export async function listModels() {
  try {
    return await call("/models");
  } catch (error) {
    if (error instanceof ApiError && error.status === 404) return null;
    throw error;
  }
}

// The URL of one of a model's routes: /models/{name}/encode for "/encode", and /models/{name} for "/model"
// (the model's description); a null name is the service's default model, on the unprefixed routes.
export function modelPath(name, route) {
  if (name === null) return route;
  const prefix = `/models/${encodeURIComponent(name)}`;
  return route === "/model" ? prefix : prefix + route;
}

export const isReady = (model) => model.state === "ready";

// The model the page starts on: the service's default when it is ready, else the first ready one, else null.
export function initialModel(listing) {
  const ready = listing.models.filter(isReady);
  const chosen = ready.find((model) => model.name === listing.default_model) || ready[0];
  return chosen ? chosen.name : null;
}

// One option per model; a model that is not ready is listed, disabled, with its state and reason.
export function fillModelPicker(select, listing, selected) {
  select.replaceChildren();
  for (const model of listing.models) {
    const option = document.createElement("option");
    option.value = model.name;
    const notes = [model.kind, model.default ? "default" : ""].filter(Boolean).join(", ");
    option.textContent = `${model.name} (${notes})` + (isReady(model) ? "" : `: ${model.state}`);
    option.disabled = !isReady(model);
    if (model.reason) option.title = model.reason;
    select.append(option);
  }
  select.value = selected;
}
