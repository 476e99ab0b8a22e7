"""`make demo`: the whole POLAR pipeline on tiny models, on a CPU, no downloads (docs/demo.md).

- `pipeline`: `DemoPipeline` and `DemoConfig`: corpus -> tokenizer -> policy pool ->
  sampling -> triplets -> pre-training -> ranked SFT -> evaluation -> HF export -> scoring,
  each stage reused when its `stage.json` records the same settings;
- `data_stages`: the pipeline's stages from the corpus to the datasets (tokenizer, policy pool
  and base LM, sampling, triplets and ranked sets);
- `model_stages`: its stages from training on: pre-training, ranked SFT, evaluation, HF export
  and scoring;
- `runner`: `Stage` and `run_stage` (reuse of finished stages, progress bars), running the
  project's CLIs, JSONL files;
- `corpus`: the text corpus, read from the sources of the pinned torch and megatron-core
  packages (prose, code, C++ headers);
- `tokenizer`: `train_tokenizer`, byte-level BPE with POLAR's special tokens;
- `policies`: the policy pool, tiny Llama LMs trained on mixes of the corpus
  (`train_policy_run`);
- `base_model`: `llama_to_internlm2`, the demo's base LM written in the InternLM2 layout that
  HF import reads;
- `workers`: worker processes for the parallel stages (policy and base-LM training,
  sampling);
- `report`: the summary text and the training curves as a PNG.
"""
