// The compare view: one image through every ready model side by side. Each model's column shows its
// reconstruction, its score verdict (or the problem its /score answered) and a few samples of its prior.
import { call } from "./api.js";
import { isReady, modelPath } from "./models.js";
import { $, clearImage, describeError, showBlob, upload, verdictParagraphs } from "./view.js";

const SAMPLES_PER_MODEL = 4;
const SAMPLE_SEED = 0; // the same seed for every model and run: what differs is the model
// PCA, then the autoencoder, then the VAE: the story the columns tell, left to right; other kinds follow.
const KIND_ORDER = ["pca", "ae", "vae"];

let latestRun = 0; // answers for an older run are dropped

function kindRank(model) {
  const rank = KIND_ORDER.indexOf(model.kind);
  return rank === -1 ? KIND_ORDER.length : rank;
}

function element(tag, properties = {}, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, properties);
  node.append(...children);
  return node;
}

// One model's column, empty until its answers come.
function column(model, index) {
  const titleId = `compare-title-${index}`;
  const reconstruction = element("img", { className: "reconstruction", alt: `Reconstruction by ${model.name}`, width: 84, height: 84 });
  const samples = element("img", { className: "samples", alt: `${SAMPLES_PER_MODEL} samples of ${model.name}'s prior` });
  const verdict = element("div", { className: "verdict" }, element("p", { textContent: "scoring..." }));
  const node = element(
    "article",
    { className: "model-column" },
    element("h3", { id: titleId, textContent: model.name }),
    element("p", { className: "hint", textContent: `${model.kind} ${model.version}` }),
    element("figure", {}, reconstruction, element("figcaption", { textContent: "reconstruction" })),
    verdict,
    element("figure", {}, samples, element("figcaption", { textContent: "prior samples" })),
  );
  node.dataset.model = model.name;
  node.setAttribute("aria-labelledby", titleId);
  return { node, reconstruction, samples, verdict };
}

function showProblem(where, error) {
  where.replaceChildren(element("p", { className: "problem", textContent: describeError(error) }));
}

// Show one answer when it comes, or its error in place; nothing once a newer run has started.
async function settle(request, isCurrent, show, fail) {
  try {
    const answer = await request;
    if (isCurrent()) show(answer);
  } catch (error) {
    if (isCurrent()) fail(error);
  }
}

function fillColumn({ reconstruction, samples, verdict }, name, image, scoreSamples, isCurrent) {
  const post = (route, accept) => call(modelPath(name, route), { method: "POST", form: upload(image), accept });
  const sampleQuery = new URLSearchParams({ n: SAMPLES_PER_MODEL, seed: SAMPLE_SEED });
  const caption = (img) => img.nextElementSibling;
  return Promise.all([
    settle(post("/reconstruct", "image/png"), isCurrent, (blob) => showBlob(reconstruction, blob),
      (error) => showProblem(caption(reconstruction), error)),
    settle(post(`/score?k=${scoreSamples}&seed=0`), isCurrent, (scores) => {
      verdict.dataset.outcome = "scored";
      verdict.replaceChildren(...verdictParagraphs(scores.items[0]));
    }, (error) => {
      verdict.dataset.outcome = "problem";
      showProblem(verdict, error);
    }),
    settle(call(modelPath(name, `/sample?${sampleQuery}`), { accept: "image/png" }), isCurrent,
      (blob) => showBlob(samples, blob), (error) => showProblem(caption(samples), error)),
  ]);
}

// Send `image` (a PNG Blob or an uploaded file) through every model that is ready now; `scoreSamples` is
// the k of each /score call.
export async function compareModels(image, scoreSamples) {
  const run = ++latestRun;
  const isCurrent = () => run === latestRun;
  const listing = await call("/models"); // the states now, not as the page found them
  if (!isCurrent()) return;
  const ready = listing.models.filter(isReady).sort((a, b) => kindRank(a) - kindRank(b));
  const box = $("compare-columns");
  box.querySelectorAll("img").forEach(clearImage);
  const columns = ready.map(column);
  box.replaceChildren(...columns.map(({ node }) => node));
  const waiting = listing.models.length - ready.length;
  $("compare-status").textContent = `${ready.length} ready models` + (waiting ? `; ${waiting} not ready` : "");
  await Promise.all(columns.map((parts, index) => fillColumn(parts, ready[index].name, image, scoreSamples, isCurrent)));
}
