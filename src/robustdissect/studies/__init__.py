"""Research studies run on the library: each is a module run with `python -m`, and nothing in
the library imports this package (`lint-imports` checks it). The stages show their shipped
results (`robustdissect/results/*.json`, read through `resources.shipped_result`).

- `yu1`: the YU-1 robustness-metric study (Ψ against adversarial accuracy over a model family).
- `ig1`: the IG-1 max- vs average-pooling study (layer diagnosis of seed pairs).
- `sns_layers`: the SNS layer-selection study (E12: SNS with the top-k layers for several k).
- `pushback`: recompute the shipped pushback results.
- `ship`: copy the finished YU-1 and IG-1 studies from docs/results into the package.
"""
