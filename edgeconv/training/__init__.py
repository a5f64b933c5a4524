"""Distillation internals: a dense student trained on its (MoE) teacher's next-token distributions."""

# models.py (teacher/student checks and loading), packing.py (packed token stream, step -> batch), losses.py
# (full-vocabulary and cached top-k forward KL), teacher_cache.py (offline teacher top-k cache), train_state.py
# (resumable state), metrics.py (JSONL + loss curve), trainer.py (the loop, on accelerate),
# fsdp_accelerate_config.yaml (FSDP launch config). The options are edgeconv.config.DistillConfig; the stage
# (checks, run key, output directory) is edgeconv.stages.distill.
