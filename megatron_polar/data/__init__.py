"""POLAR data: tokenizer, sequence format, datasets, sampling (docs/data.md, docs/format.md).

- `tokenizer`: `PolarTokenizer` (a sentencepiece `.model` or an HF tokenizer directory): text
  <-> ids with special-token text split out and dropped, the special ids (BOS, `<|reward|>`,
  the reward token), the tokenizer's identity hash; `copy_tokenizer`;
- `encoding`: the POLAR sequence and its truncation rules: `TripletEncoder` (`encode`: a
  triplet's s+ and s-; `encode_sequence`: one candidate), `EncodingConfig`, `field_text`,
  `RecordError`, `WRAPPERS`;
- `records`: JSONL input line by line with its `file:line` (`iter_lines`, `parse_json_object`,
  the `*_FIELDS` of each record kind), `atomic_file`;
- `indexed`: the on-disk format of a dataset (megatron-core `.bin`/`.idx`, `.meta.json`,
  `.rejected.jsonl`): `output_paths`, `staged_outputs` (atomic), `dataset_meta`, `read_meta`;
- `assembly`: records -> triplets: `encode_triplet`, `ranking_pairs` / `encode_ranking`,
  `record_wrapper`, and `assemble_from_trajectories` (-> an `Assembly`: triplets with their
  origin lines, rejected lines, unused count);
- `build`: `build_triplets` (`BuildConfig` -> `BuildSummary`): triplet, ranked or trajectory
  JSONL -> a dataset, encoded by worker processes in input order;
- `merge`: `merge_triplets`, the partitions of a build concatenated into one dataset;
- `dataset`: `TripletDataset` (one built dataset, validated on opening), `BlendSpec` and
  `TripletStream`, the endless deterministic stream of pairs of a blend and split;
- `packing`: whole pairs packed into THD micro-batches (`PackedMicroBatch` with its reward
  positions and `PackedSeqParams`, `best_fit_decreasing`, `pack_pairs`) and `PaddedBatch`
  for unpacked scoring;
- `sampler`: `PackingSampler`: a step is the next global batch of pairs, packed under a token
  budget (or `pairs_per_micro_batch`) and dealt to the data-parallel ranks; resumable state;
- `rlhf_prompts`: `make_rlhf_prompts`: (prompt, reference) records -> NeMo-Aligner's prompt
  files and the reward server's reference file.
"""
