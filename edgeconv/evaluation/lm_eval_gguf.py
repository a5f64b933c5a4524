"""An lm-eval model class for a GGUF, run in process by llama-cpp-python: `edgeconv-gguf`.

    import edgeconv.evaluation.lm_eval_gguf  # registers the name
    lm_eval.simple_evaluate(model="edgeconv-gguf", model_args="pretrained=model.gguf,max_length=2048", ...)

It scores exactly as lm-eval's `hf` model does (the same TemplateLM tokenization of context and continuation, the
same rolling windows, prefix token, truncation and stop handling), with llama.cpp's own tokenizer and logits:
`Llama(logits_all=True)`, `eval(ids)`, then row i of `scores` is the distribution of token i + 1, so the log-prob
of continuation token j (at position p) is read from row p - 1.

Why not lm-eval's own `gguf` model (lm_eval/models/gguf.py, 0.4.13)? It runs no model: it POSTs each request to
`{base_url}/v1/completions` with the prompt context + continuation, `echo=True`, `max_tokens=1`, `logprobs=10`, and
sums `token_logprobs[idx:-1]` from the first token whose `text_offset` reaches len(context), assuming the last
entry is the one generated token. llama.cpp's own `llama-server` refuses `echo` ("Only no echo is supported"), so
only llama-cpp-python's server answers, and its echoed logprobs (llama-cpp-python 0.3.36,
`Llama._create_completion`) pair prompt token i with logits row i, the distribution of token i + 1: for a model
that adds no BOS (Qwen2/Qwen3, our students) every echoed value is the log-prob of a token under the next
position's distribution (llama-cpp-python issue 1983), and since those rows run out before the generated token,
the `-1` drops the last continuation token instead. (With a BOS the server strips it and the rows line up.) It also
has no `loglikelihood_rolling`, so the perplexity tasks cannot run. tests/test_lm_eval_gguf.py shows the shift.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models import utils as model_utils  # also registers lm-eval's own models (only done if none is)
from tqdm import tqdm

from edgeconv.evaluation.runtimes import log_softmax

NAME = "edgeconv-gguf"


@register_model(NAME)
class GgufLM(TemplateLM):
    """model_args: pretrained (a .gguf file, or a directory holding one), max_length (the context in tokens; 2048),
    max_gen_toks (256), n_threads, n_gpu_layers (0), prefix_token_id (default: the GGUF's BOS if it declares one,
    else EOS, as lm-eval's `hf` model picks BOS, else EOS). `logits_all` keeps max_length x vocab float32 logits
    twice (llama.cpp's buffer and llama-cpp-python's copy): 2.5 GB at 2,048 tokens and Qwen's 152 k vocab."""

    def __init__(self, pretrained: str, max_length: int = 2048, max_gen_toks: int = 256, n_threads: int | None = None,
                 n_gpu_layers: int = 0, prefix_token_id: int | None = None, **kwargs):
        # kwargs: what simple_evaluate hands every model (batch_size, max_batch_size, device); one sequence at a time
        super().__init__()
        from edgeconv.export.gguf.llamacpp import _llama_cpp

        path = Path(pretrained)
        if path.is_dir():
            path = min(path.glob("*.gguf"))
        self.path = path
        self._max_length = int(max_length)
        self.max_gen_toks = int(max_gen_toks)
        self.llm = _llama_cpp().Llama(model_path=str(path), n_ctx=self._max_length, n_batch=self._max_length,
                                      logits_all=True, verbose=False, seed=0, n_gpu_layers=int(n_gpu_layers),
                                      n_threads=int(n_threads) if n_threads else None)
        self.add_bos = bool(self.llm._model.add_bos_token())
        if prefix_token_id is not None:
            self._prefix = int(prefix_token_id)
        elif self.llm.metadata.get("tokenizer.ggml.bos_token_id") is not None:
            self._prefix = self.llm.token_bos()
        else:
            self._prefix = self.llm.token_eos()

    # ------------------------------------------------------------------ tokens
    @property
    def eot_token_id(self) -> int:
        return self.llm.token_eos()

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.path.name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # As lm-eval's hf model: the model's own BOS rule unless told, special tokens in the text parsed.
        add = self.add_bos if add_special_tokens is None else add_special_tokens
        if add_special_tokens is None and self.add_bos and string.startswith(self.tok_decode([self.llm.token_bos()])):
            add = False
        return self.llm.tokenize(string.encode("utf-8"), add_bos=add, special=True)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.llm.detokenize(list(tokens)).decode("utf-8", errors="replace")

    # ------------------------------------------------------------------ the model
    def _rows(self, ids: list[int]) -> np.ndarray:
        """Logits rows for `ids` (row i: the distribution of token i + 1). The KV cache of the longest prefix
        shared with the previous call is kept (multiple-choice continuations share their context)."""
        if not ids:
            raise ValueError(f"{NAME}: nothing to evaluate (an empty context)")
        held = self.llm.input_ids[: min(self.llm.n_tokens, len(ids) - 1)]  # what the context holds now
        differ = np.flatnonzero(held != np.asarray(ids[: len(held)]))
        self.llm.n_tokens = int(differ[0]) if differ.size else len(held)  # eval() drops the cache from here on
        self.llm.eval(ids[self.llm.n_tokens:])
        return self.llm.scores[: len(ids)]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Each request: ((context, continuation), context ids, continuation ids). As lm-eval's hf model, the
        input is (context + continuation)[-(max_length + 1):][:-1], and continuation token j is scored from the
        row before it."""
        order = sorted(range(len(requests)), key=lambda i: requests[i][1] + requests[i][2])
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        for i in tqdm(order, disable=disable_tqdm, desc="edgeconv-gguf loglikelihood"):
            key, context_enc, continuation_enc = requests[i]
            whole = (context_enc + continuation_enc)[-(self.max_length + 1):]
            inp, n = whole[:-1], len(continuation_enc)
            logp = log_softmax(self._rows(inp)[len(inp) - n:])
            out[i] = (float(logp[np.arange(n), continuation_enc].sum()),
                      bool((logp.argmax(axis=-1) == np.array(continuation_enc)).all()))
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, out[i])
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """As lm-eval's hf model: disjoint windows of max_length tokens, the first after the prefix token."""
        out = []
        for (string,) in tqdm([r.args for r in requests], disable=disable_tqdm, desc="edgeconv-gguf rolling"):
            windows = [(None,) + lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1)]
            total = sum(ll for ll, _ in self._loglikelihood_tokens(windows, disable_tqdm=True))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding (argmax of the logits) until a stop string, EOS or max_gen_toks; the context is
        left-truncated to max_length - max_gen_toks tokens and the text cut at the first stop string, as hf does."""
        out = []
        eos = self.tok_decode([self.eot_token_id])
        for context, gen_kwargs in tqdm([r.args for r in requests], disable=disable_tqdm,
                                        desc="edgeconv-gguf generate"):
            kwargs = model_utils.normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            if kwargs.get("do_sample") and kwargs.get("temperature", 0.0) > 0:
                raise ValueError(f"{NAME} decodes greedily only; the task asks for sampling")
            until = model_utils.handle_stop_sequences(kwargs.get("until"), eos=eos)
            max_gen = int(kwargs["max_gen_toks"])
            ids = self.tok_encode(context)[-(self.max_length - max_gen):]
            new: list[int] = []
            token = int(np.argmax(self._rows(ids)[-1]))
            while True:
                new.append(token)
                text = self.tok_decode(new)
                if token == self.eot_token_id or len(new) >= max_gen or any(s and s in text for s in until):
                    break
                self.llm.eval([token])
                token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            text = model_utils.postprocess_generated_text(text, until, None)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out

    def close(self) -> None:
        self.llm.close()
