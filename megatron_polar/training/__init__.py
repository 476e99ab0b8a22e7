"""Training POLAR reward models (docs/training.md).

- `trainer`: `Trainer`, the run top to bottom (set up, resume, then a loop of calls: step,
  log, validator, checkpoint policy, SIGTERM), and `main`, behind `python -m
  megatron_polar.train`;
- `policies`: the objects that decide one thing each and keep their state across a
  checkpoint: `NaNGuard`, `MetricsWindow`, `Validator`, `CheckpointPolicy`;
- `batches`: `TrainingData`, the training and validation streams, the packing sampler and the
  schedule length, checked against the model before any step;
- `optimizer`: `OptimizerSettings` and `build_optimizer`, megatron's optimizer and LR
  scheduler for the trainer, the PPO critic and the synthetic run alike;
- `faults`: `FaultInjector`, the trainer's fault-injection flags as a hook (tests only);
- `config`: `TrainConfig`, the trainer's typed config: one frozen dataclass per component
  (`DataConfig`, `OptimConfig`, `CheckpointConfig`, `LoggingConfig`, `FaultConfig`) whose
  fields are the flags, checked in `__post_init__`;
- `arguments`: the trainer's Megatron-style flags (`build_train_parser` / `parse_train_args`,
  a `--config` YAML through `yaml_defaults`), derived values resolved once
  (`resolve_train_args`) and written into the run directory (`write_resolved_config`), and
  the model group every tool shares (`add_model_args`, generated from `ModelRunConfig`;
  `run_config_from_args`);
- `step`: one training step through megatron's schedules with the pairwise loss
  (`train_step`, `pair_forward_step`; `guarded_optimizer_step` skips non-finite steps),
  `evaluate_pairs`, TE userbuffers for TP communication overlap;
- `objective`: `pairwise_loss`, -log sigmoid(r+ - r-) under megatron's per-token-loss
  contract with pairs as the unit, and the pair metrics (`PairMetrics`);
- `checkpointing`: training checkpoints in Megatron-LM's `iter_N` layout (`CheckpointWriter`,
  `load_checkpoint`, `training_state_dict`: model, optimizer, scheduler, sampler, RNG);
- `hparams`: the paper's LR and batch laws (`polar_hparams`, for `--auto-hparams`);
- `flops`: model FLOPs of a step and GPU peaks, for TFLOP/s and MFU;
- `reporting`: `Reporter`: stdout, JSON lines, TensorBoard, Weights & Biases, from rank 0;
- `gpu_check/`: `make gpu-check`, the checks to run first on a new GPU node (a package: the
  items by theme, the report, the runner; its docstring maps the modules).
"""
