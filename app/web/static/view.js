// What the explorer and the compare view both show: images from Blobs, uploads, errors and score verdicts.
import { ApiError } from "./api.js";

export const $ = (id) => document.getElementById(id);

// One line for an error: the problem JSON's title, status and detail, or the error's own message.
export function describeError(error) {
  return error instanceof ApiError ? `${error.title} (${error.status}): ${error.detail}` : String(error);
}

export function showBlob(img, blob) {
  const previous = img.dataset.url;
  const url = URL.createObjectURL(blob);
  img.src = url;
  img.dataset.url = url;
  if (previous) URL.revokeObjectURL(previous);
  return url;
}

// Empty an image that showed a Blob (an empty image is hidden by the style sheet).
export function clearImage(img) {
  if (img.dataset.url) URL.revokeObjectURL(img.dataset.url);
  delete img.dataset.url;
  img.removeAttribute("src");
}

// A multipart body with one image file.
export function upload(blob, field = "file") {
  const form = new FormData();
  form.append(field, blob, "drawing.png");
  return form;
}

// The verdict on one /score item, as paragraphs: typical or anomalous, then the score and its p-value.
export function verdictParagraphs(score) {
  const verdict = document.createElement("p");
  if (score.anomalous === null) {
    verdict.textContent = "no reference scores: no verdict";
  } else {
    verdict.className = score.anomalous ? "anomalous" : "typical";
    verdict.textContent = score.anomalous ? "Anomalous" : "Typical";
  }
  const parts = [];
  if (typeof score.negative_elbo === "number") parts.push(`-ELBO ${score.negative_elbo.toFixed(1)} nats`);
  if (typeof score.percentile === "number") parts.push(`percentile ${score.percentile.toFixed(1)}`);
  if (typeof score.p_value === "number") parts.push(`p = ${score.p_value.toFixed(3)}`);
  const details = document.createElement("p");
  details.textContent = parts.join(", ");
  return [verdict, details];
}
