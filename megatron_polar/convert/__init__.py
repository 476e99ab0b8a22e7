"""Hugging Face <-> megatron-core conversion for InternLM2-style POLAR reward models
(docs/export.md).

- `importer`: `import_hf` (`tools/convert_hf.py import`): an InternLM2/2.5 base or reward
  model, or our `llama-seqcls` export -> a megatron-core weights checkpoint in parts, with
  `model.json`, `tokenizer/` and `hf/`;
- `exporter`: `export_hf` (`tools/convert_hf.py export`): a checkpoint saved at any TP/PP ->
  an HF directory in the released `internlm2` layout or the `llama-seqcls` one;
- `layout`: which HF tensors make which megatron tensor, per layout (`units`, `Unit`,
  `TensorMap`; the `wqkv` row order, `w1`/`w3` as `linear_fc1`);
- `hf_config`: HF `config.json` <-> `ModelPreset` (`preset_from_hf_config`,
  `reward_model_config`, `llama_seqcls_config`, `base_model_config`), `ConversionError`;
- `hf_files`: HF weight files read and written one tensor at a time (`HFWeightReader`,
  `SafetensorsShardWriter`);
- `remote_code`: the released `modeling_internlm2.py` files an `internlm2` export ships,
  found in the imported directory or the installed xtuner, never written by us.
"""
