"""One scoring interface over the three runtimes a user ships to: torch (an HF checkpoint directory), a GGUF
through llama-cpp-python, and ONNX through onnxruntime (optimum's graph) or onnxruntime-genai (its builder's).

A runtime tokenizes with its own tokenizer (llama.cpp's for a GGUF, as on the device; export checked it equals
the HF one) and gives next-token log-probabilities for a whole sequence and greedy continuations.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgeconv.errors import EdgeconvError
from edgeconv.registry import Registry


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    m = logits.max(axis=-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(axis=-1, keepdims=True))


class Runtime:
    """Subclasses give `logits(ids) -> [len(ids), vocab]`, `encode`, `decode`; the rest is shared.

    `prefers_batches`: one call with many sequences costs about what one call with one sequence does (a model
    run layer by layer reads all its weights once per call), so the suite hands over everything at once:
    all perplexity windows, all multiple-choice continuations, all greedy prompts (`greedy_batch`)."""

    name = "?"
    eos_id: int | None = None
    prefers_batches = False

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def logits(self, ids: list[int]) -> np.ndarray:
        raise NotImplementedError

    def logits_batch(self, batch: list[list[int]]) -> list[np.ndarray]:
        return [self.logits(ids) for ids in batch]

    def token_logprobs(self, batch: list[list[int]]) -> list[np.ndarray]:
        """For each sequence, log p(ids[i] | ids[:i]) for i >= 1 (len(ids) - 1 values)."""
        out = []
        for ids, logits in zip(batch, self.logits_batch(batch)):
            lp = log_softmax(logits[:-1])
            out.append(lp[np.arange(len(ids) - 1), ids[1:]])
        return out

    def greedy(self, ids: list[int], max_new: int, stop: str = "\n") -> str:
        """Greedy continuation of `ids`, cut at the first `stop` (or EOS, or `max_new` tokens)."""
        new: list[int] = []
        token = self.first_token(ids)
        while len(new) < max_new and token != self.eos_id:
            new.append(token)
            text = self.decode(new)
            if stop in text:
                return text.split(stop)[0]
            if len(new) < max_new:
                token = self.next_token(token)
        return self.decode(new)

    def greedy_batch(self, prompts: list[list[int]], max_new: int, stop: str = "\n") -> list[str]:
        """`greedy` of every prompt (a runtime that prefers batches decodes them together)."""
        return [self.greedy(ids, max_new, stop) for ids in prompts]

    # The greedy loop's two steps. Here the whole prefix is re-run at every step; runtimes with a KV cache
    # override both to feed one token at a time.
    def first_token(self, ids: list[int]) -> int:
        self._prefix = list(ids)
        return int(np.argmax(self.logits(self._prefix)[-1]))

    def next_token(self, token: int) -> int:
        self._prefix.append(token)
        return int(np.argmax(self.logits(self._prefix)[-1]))

    def close(self) -> None:
        pass


class HfTokenized(Runtime):
    """A runtime that tokenizes with the transformers tokenizer saved beside the model."""

    tokenizer = None

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


RUNTIMES: Registry[Callable[[Path, int | None], Runtime]] = Registry("runtime")


@RUNTIMES.register("torch")
class TorchRuntime(HfTokenized):
    """An HF checkpoint in transformers: the whole model when it fits in memory, else one decoder layer at a time
    (edgeconv.forward; then every call reads the model once, so the suite batches everything: see Runtime).
    `forward`: device, dtype and the choice (default: CPU, float32, whole model when it fits)."""

    name = "torch"

    def __init__(self, path: Path, threads: int | None = None, forward=None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from edgeconv.forward.layer_by_layer import ForwardOptions, LayerByLayerModel, use_layer_by_layer
        from edgeconv.io.checkpoint import Checkpoint

        forward = forward or ForwardOptions(device="cpu", dtype="float32")
        self.device, dtype = forward.resolve()
        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.eos_id = self.tokenizer.eos_token_id
        ckpt = Checkpoint.open(path)
        self.model = self.lbl = None
        if use_layer_by_layer(ckpt, "eval", dtype, self.device, forward.layer_by_layer):
            self.lbl = LayerByLayerModel(ckpt, device=self.device, dtype=dtype, chunk_sequences=forward.chunk_sequences,
                                         max_activation_bytes=forward.max_activation_bytes)
            self.prefers_batches = True
        else:
            ckpt.close()
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device).eval()

    def logits(self, ids: list[int]) -> np.ndarray:
        return self.logits_batch([ids])[0]

    def logits_batch(self, batch: list[list[int]]) -> list[np.ndarray]:
        if self.lbl is not None:
            return self.lbl.full_logits(batch)
        # Sequences of one length go through together (perplexity windows all have the window's length).
        out: list[np.ndarray | None] = [None] * len(batch)
        by_len: dict[int, list[int]] = {}
        for i, ids in enumerate(batch):
            by_len.setdefault(len(ids), []).append(i)
        with self.torch.no_grad():
            for idx in by_len.values():
                for chunk in range(0, len(idx), 8):
                    part = idx[chunk:chunk + 8]
                    x = self.torch.tensor([batch[i] for i in part], device=self.device)
                    logits = self.model(input_ids=x).logits.float().cpu().numpy()
                    for j, i in enumerate(part):
                        out[i] = logits[j]
        return out  # type: ignore[return-value]

    def token_logprobs(self, batch: list[list[int]]) -> list[np.ndarray]:
        if self.lbl is not None:  # reduced a few sequences at a time: no [n, L, vocab] logits held
            return self.lbl.token_logprobs(batch)
        return super().token_logprobs(batch)

    def greedy(self, ids: list[int], max_new: int, stop: str = "\n") -> str:
        if self.lbl is not None:
            return self.greedy_batch([ids], max_new, stop)[0]
        return super().greedy(ids, max_new, stop)

    def greedy_batch(self, prompts: list[list[int]], max_new: int, stop: str = "\n") -> list[str]:
        """Layer by layer: all prompts decoded together, one pass over the model per generated token, with each
        layer's KV cache kept in memory. The same text as `greedy` gives, prompt by prompt."""
        if self.lbl is None:
            return super().greedy_batch(prompts, max_new, stop)

        def finished(i: int, new: list[int]) -> bool:
            return new[-1] == self.eos_id or stop in self.decode(new)

        out = []
        for new in self.lbl.greedy(prompts, max_new, finished):
            if new and new[-1] == self.eos_id:
                new = new[:-1]
            text = self.decode(new)
            out.append(text.split(stop)[0] if stop in text else text)
        return out

    # Incremental with the model's KV cache: re-running the whole prefix at every step and converting its full
    # logits made greedy skills 90 % of an eval's time.
    def first_token(self, ids: list[int]) -> int:
        with self.torch.no_grad():
            self._out = self.model(input_ids=self.torch.tensor([list(ids)], device=self.device), use_cache=True)
        return int(self._out.logits[0, -1].argmax())

    def next_token(self, token: int) -> int:
        with self.torch.no_grad():
            self._out = self.model(input_ids=self.torch.tensor([[token]], device=self.device),
                                   past_key_values=self._out.past_key_values, use_cache=True)
        return int(self._out.logits[0, -1].argmax())

    def close(self) -> None:
        if self.lbl is not None:
            self.lbl.close()


@RUNTIMES.register("gguf")
class GgufRuntime(Runtime):
    """llama-cpp-python with logits for every position: `eval` then `scores`. (Its `echo` logprobs of a prompt
    are shifted by one position, llama-cpp-python issue 1983, so they are not used.)"""

    name = "gguf"

    def __init__(self, path: Path, threads: int | None = None, n_ctx: int = 512):
        from edgeconv.export.gguf.llamacpp import _llama_cpp

        llama_cpp = _llama_cpp()
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, seed=0,
                                   n_threads=threads or os.cpu_count(), n_batch=n_ctx)
        self.eos_id = self.llm.token_eos()
        self.n_ctx = n_ctx

    def encode(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def decode(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids).decode("utf-8", errors="replace")

    def logits(self, ids: list[int]) -> np.ndarray:
        if len(ids) > self.n_ctx:
            raise EdgeconvError(f"a {len(ids)}-token sequence is longer than the GGUF context {self.n_ctx}",
                                "lower --window")
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    # Incremental: the KV cache keeps the prompt, one token is evaluated per step.
    def first_token(self, ids: list[int]) -> int:
        self.llm.reset()
        self.llm.eval(list(ids))
        return int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))

    def next_token(self, token: int) -> int:
        self.llm.eval([token])
        return int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))

    def close(self) -> None:
        self.llm.close()


def _hf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise EdgeconvError(f"{path} holds no tokenizer transformers can load ({type(exc).__name__})",
                            "export with edgeconv, which copies the tokenizer next to the ONNX model")


@RUNTIMES.register("onnx")
class OnnxRuntime(HfTokenized):
    """optimum's decoder graph in onnxruntime (one prefill per call with an empty cache)."""

    name = "onnx"

    def __init__(self, path: Path, threads: int | None = None):
        from edgeconv.export.onnx.exporter import onnx_session

        model = path / "model.onnx" if path.is_dir() else path
        self.session = onnx_session(model)
        self.tokenizer = _hf_tokenizer(model.parent)
        self.eos_id = self.tokenizer.eos_token_id

    def logits(self, ids: list[int]) -> np.ndarray:
        from edgeconv.export.onnx.exporter import onnx_logits

        return onnx_logits(self.session, [ids])[0]


@RUNTIMES.register("onnx-genai")
class GenaiRuntime(HfTokenized):
    """A model built by onnxruntime-genai's builder, run by its own generator."""

    name = "onnx-genai"

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime_genai as og

        config = og.Config(str(path))
        if not og.is_cuda_available():
            config.clear_providers()
        self.og = og
        self.model = og.Model(config)
        self.context = json.loads((path / "genai_config.json").read_text())["model"]["context_length"]
        self.tokenizer = _hf_tokenizer(path)
        self.eos_id = self.tokenizer.eos_token_id

    def logits(self, ids: list[int]) -> np.ndarray:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=min(len(ids) + 1, self.context))
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(np.array(ids, dtype=np.int32))
        out = np.array(generator.get_output("logits"))[0].astype(np.float32)
        del generator
        return out


def detect_runtime(path: Path) -> str:
    """Which runtime a path is for: a .gguf file, a genai dir, an ONNX file or dir, or an HF checkpoint."""
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    if path.is_file() and path.suffix == ".onnx":
        return "onnx"
    if path.is_dir():
        if (path / "genai_config.json").exists():
            return "onnx-genai"
        if (path / "model.onnx").exists():
            return "onnx"
        if (path / "config.json").exists():
            return "torch"
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf"
    raise EdgeconvError(f"{path} is not a model edgeconv can evaluate",
                        "pass an HF checkpoint directory, a .gguf file, or an ONNX export directory")


def open_runtime(path: Path, runtime: str | None = None, threads: int | None = None, forward=None) -> Runtime:
    """`forward` (edgeconv.forward's ForwardOptions: device, dtype, whole or layer by layer) is for the torch
    runtime; other runtimes refuse anything but its defaults."""
    from edgeconv.forward.layer_by_layer import ForwardOptions

    path = Path(path)
    name = runtime or detect_runtime(path)
    if name == "gguf" and path.is_dir():
        path = min(path.glob("*.gguf"))
    if name == "torch":
        return TorchRuntime(path, threads, forward)
    if forward is not None and forward != ForwardOptions():
        raise EdgeconvError(f"--device, --dtype and --layer-by-layer/--whole-model are for the torch runtime, and "
                            f"{path.name} runs in {name}", "drop them, or evaluate the HF checkpoint it came from")
    return RUNTIMES.get(name)(path, threads)
