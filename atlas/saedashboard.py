"""
SAEDashboard-compatible `batch-N.json` files (spec §1.4), written from our Neuronpedia rows.

SAEDashboard's NeuronpediaRunner writes these files, and two upstream converters
(neuronpedia-utils' convert-saedashboard-to-neuronpedia-export.py and
sae_dashboard.neuronpedia.neuronpedia_export) turn them into Neuronpedia's bulk layout. Writing
the same data in this shape lets anyone regenerate our bulk export with their tools, as a
cross-check of ours.

Notable choices
- 128 features per file (SAEDashboard's n_features_at_a_time), `layer` an int,
  `sae_id_suffix` null, feature_index an int.
- Every key the converters index directly is present (they raise KeyError otherwise),
  including the ones we leave empty (neuron alignment, correlated neurons, vector).
- `skipped_indexes` is empty: every feature is written, dead ones included.
- Built from the exporter's rows, not from the store, so both outputs cannot drift apart.
"""

from __future__ import annotations

import json
from pathlib import Path

FEATURES_PER_BATCH = 128

# Keys with the same name and meaning in Neuronpedia's Neuron rows and in SAEDashboard features.
SHARED_KEYS = (
    "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
    "correlated_neurons_indices", "correlated_neurons_l1", "correlated_neurons_pearson",
    "correlated_features_indices", "correlated_features_l1", "correlated_features_pearson",
    "neg_str", "neg_values", "pos_str", "pos_values", "frac_nonzero",
    "freq_hist_data_bar_values", "freq_hist_data_bar_heights",
    "logits_hist_data_bar_heights", "logits_hist_data_bar_values",
    "decoder_weights_dist", "vector",
)
FEATURE_KEYS = ("feature_index", *SHARED_KEYS, "n_prompts_total", "n_tokens_in_prompt",
                "dataset", "activations")
ACTIVATION_KEYS = ("bin_min", "bin_max", "bin_contains", "tokens", "values",
                   "qualifying_token_index")


def feature_from_rows(neuron: dict, activations: list[dict], n_prompts: int | None,
                      n_tokens_in_prompt: int | None, dataset: str | None) -> dict:
    """One SAEDashboard feature from a Neuronpedia `Neuron` row and its `Activation` rows."""
    return {
        "feature_index": int(neuron["index"]),
        **{k: neuron[k] for k in SHARED_KEYS},
        "n_prompts_total": n_prompts,
        "n_tokens_in_prompt": n_tokens_in_prompt,
        "dataset": dataset,
        "activations": [
            {"bin_min": a["binMin"], "bin_max": a["binMax"], "bin_contains": a["binContains"],
             "tokens": a["tokens"], "values": a["values"],
             "qualifying_token_index": a["qualifyingTokenIndex"]}
            for a in activations
        ],
    }


class Writer:
    """Collects features in index order and writes one batch-{k}.json per 128 of them."""

    def __init__(self, folder: Path, model_id: str, layer: int, sae_set: str):
        self.folder, self.model_id, self.layer, self.sae_set = folder, model_id, layer, sae_set
        self.pending: list[dict] = []
        self.batches = 0
        folder.mkdir(parents=True, exist_ok=True)

    def add(self, feature: dict) -> None:
        self.pending.append(feature)
        if len(self.pending) == FEATURES_PER_BATCH:
            self._flush()

    def close(self, run_settings: dict) -> None:
        if self.pending:
            self._flush()
        skipped = {"model_id": self.model_id, "layer": self.layer, "sae_set": self.sae_set,
                   # SAEDashboard skips features whose log10 density exceeds this threshold;
                   # 1 is its default and skips nothing, which is what we did.
                   "log_sparsity": 1, "skipped_indexes": []}
        _write_json(self.folder / "skipped_indexes.json", skipped)
        _write_json(self.folder / "run_settings.json", run_settings)

    def _flush(self) -> None:
        batch = {"model_id": self.model_id, "layer": self.layer, "sae_set": self.sae_set,
                 "sae_id_suffix": None, "features": self.pending}
        _write_json(self.folder / f"batch-{self.batches}.json", batch)
        self.batches += 1
        self.pending = []


def _write_json(path: Path, obj) -> None:
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    path.write_bytes((text + "\n").encode("utf-8"))
