"""The `local` provider: a GGUF model run in-process by llama.cpp (llama-cpp-python), token by token.

llama.cpp is synchronous and one model context is not thread-safe, so each loaded model gets one worker thread:
requests queue for it in order, and the event loop never waits on generation. Tokens cross to the loop with
`call_soon_threadsafe`; a consumer that goes away sets a flag the worker checks before every token, so a cancelled
request stops generating at once and the next one starts. The provider matches the stop sequences itself, so a
finish names the one that ended the answer.

CountTokens is exact: the prompt as the chat template renders it for a completion, through the model's tokenizer.

The queue is bounded: a request finding `max_queue` jobs already waiting for the engine, or waiting longer than
`max_queue_wait_seconds` for the worker, is refused as OVERLOADED with a Retry-After, and nothing is generated for it.
A conversation that cannot fit the context (more messages than tokens, or more characters than the longest token
times the context) is refused on the event loop, before it is queued for the tokenizer.
"""

from __future__ import annotations

import asyncio
import codecs
import ctypes
import importlib.util
import threading
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar
from llama_cpp.llama_types import ChatCompletionRequestMessage

from modelmax.v1 import completion_pb2 as pb
from modelmax.v1 import completion_service_pb2 as svc
from services.catalog import CatalogEntry
from services.errors import GatewayError

_OPTIONS = {"threads", "context_length", "default_max_tokens", "seed", "max_queue", "max_queue_wait_seconds"}
_PACKAGE_PREFIX = "pkg:"
_ROLE_NAMES: dict[pb.Role.ValueType, Literal["system", "user", "assistant"]] = {
    pb.Role.ROLE_SYSTEM: "system",
    pb.Role.ROLE_USER: "user",
    pb.Role.ROLE_ASSISTANT: "assistant",
}
_RETRY_AFTER = 1.0  # seconds, in an OVERLOADED refusal: a job ahead is likely done by then
_TOP_K = 40  # llama.cpp's default, when the request sets none
_SEEDS = 0xFFFFFFFF  # llama.cpp seeds are uint32, and 0xFFFFFFFF (LLAMA_DEFAULT_SEED) itself means "random"


def resolve_model_path(model: str) -> Path:
    """A GGUF path; `pkg:<package>/<file>` names a file shipped inside an installed package (not imported)."""
    if not model.startswith(_PACKAGE_PREFIX):
        return Path(model).expanduser()
    package, _, relative = model[len(_PACKAGE_PREFIX) :].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / relative


def _chat_message(message: pb.Message) -> ChatCompletionRequestMessage:
    """One message as llama-cpp-python's chat formatter takes it: its role's name and its text. An assistant
    message's `reasoning` is not sent: the chat template has no place for another model's thinking."""
    # No tool messages (and so no `is_error`): `supported` has no "tools", so the core refuses them.
    role = _ROLE_NAMES[message.role]
    if role == "system":
        return {"role": "system", "content": message.content}
    if role == "user":
        return {"role": "user", "content": message.content}
    return {"role": "assistant", "content": message.content}


@dataclass(frozen=True, slots=True, eq=False)  # eq=False: hashed by identity, for the engine's set of waiting jobs
class _Job:
    """One generation, as the worker thread sees it."""

    messages: list[ChatCompletionRequestMessage]
    temperature: float
    top_p: float
    top_k: int
    max_tokens: int | None
    stops: tuple[str, ...]
    seed: int | None  # None: the engine's own (the catalog's `seed` option, random by default)
    presence_penalty: float
    frequency_penalty: float
    json: bool  # response_format json_object: sample only what llama.cpp's JSON grammar allows
    cancelled: threading.Event
    emit: Callable[[tuple[Any, ...]], object]  # what it returns is ignored
    deadline: float = float("inf")  # time.monotonic() after which the worker must not start it


class _Engine:
    """One loaded model and the single thread that runs it."""

    def __init__(self, path: Path, threads: int, context_length: int, seed: int) -> None:
        self._llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=context_length,
            n_threads=threads,
            n_threads_batch=threads,
            seed=seed,
            verbose=False,
        )
        template = self._llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise ValueError("the GGUF has no tokenizer.chat_template")
        self._formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=self._token_text(self._llm.token_eos()),
            bos_token=self._token_text(self._llm.token_bos()),
        )
        # llama.cpp may round its context up (to a multiple of 256); the catalog's value is the limit we honour.
        self._context_length = min(context_length, self._llm.n_ctx())
        self._seed = seed or llama_cpp.LLAMA_DEFAULT_SEED  # as Llama() reads it: 0 also means random
        self._json = LlamaGrammar.from_string(JSON_GBNF, verbose=False)  # a JSON object, llama.cpp's own grammar
        self._longest_token = self._longest_token_bytes()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llama-{path.stem}")
        self._lock = threading.Lock()  # guards _waiting, shared by the event loop and the worker
        self._waiting: set[_Job] = set()  # submitted, not yet taken by the worker nor withdrawn

    def _longest_token_bytes(self) -> int:
        """The most bytes any one token stands for: a prompt of n bytes is at least n / this many tokens."""
        vocab = self._llm._model.vocab
        buffer = ctypes.create_string_buffer(1024)
        longest = 1
        for token in range(self._llm.n_vocab()):
            size = llama_cpp.llama_token_to_piece(vocab, token, buffer, len(buffer), 0, True)
            longest = max(longest, abs(size))  # negative: the piece needs that many bytes (more than the buffer)
        return longest

    def check_fits(self, messages: Sequence[pb.Message]) -> None:
        """Refuse, cheaply and before tokenizing, a conversation that cannot fit the context: every message is at
        least one token, and every token at most `_longest_token` bytes (so characters). The worker still counts the
        tokens exactly."""
        if len(messages) < self._context_length:
            characters = sum(len(message.content) for message in messages)
            if -(-characters // self._longest_token) < self._context_length:
                return
            why = f"{characters} characters"
        else:
            why = f"{len(messages)} messages"
        raise GatewayError(
            pb.ErrorReason.ERROR_REASON_CONTEXT_LENGTH_EXCEEDED,
            f"This model's maximum context length is {self._context_length} tokens; the messages ({why}) cannot fit.",
            field="messages",
        )

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self._llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    def submit(self, job: _Job, max_queue: int) -> asyncio.Future[None]:
        """Queue `job` for the worker, unless `max_queue` jobs already wait for it."""
        with self._lock:
            if len(self._waiting) >= max_queue:
                raise _overloaded(f"{len(self._waiting)} requests are already waiting for this model")
            self._waiting.add(job)
        try:
            return asyncio.wrap_future(self._executor.submit(self._run, job))
        except BaseException:
            self.withdraw(job)
            raise

    @property
    def waiting(self) -> int:
        """Jobs submitted and not yet taken by the worker: the queue's depth (the running job aside)."""
        return len(self._waiting)  # one read of a set's size: no lock needed for a gauge

    def withdraw(self, job: _Job) -> bool:
        """Take `job` back if the worker has not taken it yet; True if it had not (it will never run)."""
        with self._lock:
            if job in self._waiting:
                self._waiting.remove(job)
                return True
            return False

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._llm.close()

    def _run(self, job: _Job) -> None:
        """Worker thread: template, tokenize, sample token by token until EOG, a stop sequence or a limit."""
        if not self.withdraw(job) or job.cancelled.is_set():
            return  # withdrawn by its request (it waited too long) or abandoned by its caller
        if time.monotonic() > job.deadline:
            job.emit(("error", _overloaded("the request waited too long for this model")))
            return
        try:
            self._generate(job)
        except GatewayError as exc:
            job.emit(("error", exc))
        except Exception as exc:  # a llama.cpp failure is a bug to report, not to hang on
            job.emit(("error", exc))

    def prompt_tokens(self, messages: list[ChatCompletionRequestMessage]) -> list[int]:
        """The prompt of a completion of `messages`: the chat template's rendering, tokenized.

        Safe beside the worker's generation (CountTokens calls it from another thread): the template only renders
        text, and llama.cpp's tokenizer reads the model's vocabulary, never the context the worker evaluates in.
        """
        formatted = self._formatter(messages=messages)
        return self._llm.tokenize(formatted.prompt.encode("utf-8"), add_bos=not formatted.added_special, special=True)

    def _generate(self, job: _Job) -> None:
        llm = self._llm
        prompt = self.prompt_tokens(job.messages)
        room = self._context_length - len(prompt)
        if room < 1:
            raise GatewayError(
                pb.ErrorReason.ERROR_REASON_CONTEXT_LENGTH_EXCEEDED,
                f"This model's maximum context length is {self._context_length} tokens; "
                f"the messages use {len(prompt)}.",
                field="messages",
            )
        limit = room if job.max_tokens is None else min(job.max_tokens, room)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        held = ""  # text kept back because it may be the start of a stop sequence
        generated = 0
        finish = pb.FinishReason.FINISH_REASON_LENGTH
        matched = ""  # the stop sequence that ended the answer
        vocab = llm._model.vocab  # no public accessor for end-of-generation tokens in llama-cpp-python 0.3
        # The sampler is built per generate() from the current seed: a request's seed, else the engine's own again.
        llm.set_seed(self._seed if job.seed is None else job.seed % _SEEDS)
        # Evaluate the whole prompt every time: reusing the previous request's matching prefix evaluates the rest in
        # other batch shapes, whose float sums differ, so the same request (same seed) could sample other tokens
        # depending on what ran before it. A 135M model evaluates a prompt in milliseconds.
        llm.reset()  # type: ignore[no-untyped-call]  # llama-cpp-python 0.3 leaves Llama.reset() unannotated
        tokens = llm.generate(
            prompt,
            temp=job.temperature,
            top_p=job.top_p,
            top_k=job.top_k,
            presence_penalty=job.presence_penalty,
            frequency_penalty=job.frequency_penalty,
            grammar=self._json if job.json else None,
            reset=True,
        )
        for token in tokens:
            if job.cancelled.is_set():
                return
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                finish = pb.FinishReason.FINISH_REASON_STOP
                break
            generated += 1
            held += decoder.decode(llm.detokenize([token]))
            stop = _first_stop(held, job.stops)
            if stop is not None:
                cut, matched = stop
                held = held[:cut]
                finish = pb.FinishReason.FINISH_REASON_STOP
                break
            keep = _partial_stop_length(held, job.stops)
            if len(held) > keep:
                job.emit(("text", held[: len(held) - keep]))
                held = held[len(held) - keep :]
            if generated >= limit:
                break
        if held:
            job.emit(("text", held))
        job.emit(("finish", finish, matched, len(prompt), generated))


def _first_stop(text: str, stops: tuple[str, ...]) -> tuple[int, str] | None:
    """(where, which) of the stop sequence that occurs first in `text` (the first listed, of those at one place)."""
    found = [(position, stop) for stop in stops if (position := text.find(stop)) >= 0]
    return min(found, key=lambda item: item[0]) if found else None


def _partial_stop_length(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop sequence."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


def _overloaded(why: str) -> GatewayError:
    return GatewayError(
        pb.ErrorReason.ERROR_REASON_OVERLOADED,
        f"The local model is overloaded ({why}); retry later.",
        provider="local",
        retry_after=_RETRY_AFTER,
    )


class LocalProvider:
    """Serves one catalog entry from a shared engine."""

    # What llama.cpp's sampler honours: Llama.generate takes the penalties, its dist sampler the seed, and a grammar
    # holds the output to JSON (response_format json_object only; see _refuse_json_schema), and its top-k sampler
    # top_k. Tools, images, several choices, log probabilities and reasoning (an effort or a budget) have no honest
    # mapping onto a small chat model here.
    supported = frozenset({"seed", "presence_penalty", "frequency_penalty", "response_format", "top_k"})
    server_address = ""  # in this process: no server to tell apart
    server_port: int | None = None

    def __init__(
        self, engine: _Engine, default_max_tokens: int | None, *, max_queue: int = 16, max_queue_wait: float = 30.0
    ) -> None:
        self._engine = engine
        self._default_max_tokens = default_max_tokens
        self._max_queue = max_queue  # jobs waiting for the engine (its running one aside), counted per engine
        self._max_queue_wait = max_queue_wait  # seconds a job may wait for the worker to take it

    def queue_depth(self) -> int:
        """Requests waiting for this model's worker (services/metrics.py exports it per model)."""
        return self._engine.waiting

    async def stream(
        self, params: pb.CompletionParams, *, incremental: bool = True
    ) -> AsyncGenerator[svc.StreamCompletionResponse, None]:
        if params.response_format.type == pb.ResponseFormatType.RESPONSE_FORMAT_TYPE_JSON_SCHEMA:
            _refuse_json_schema(params.model)
        self._engine.check_fits(params.messages)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()  # bounded by the context length
        job = _Job(
            messages=[_chat_message(m) for m in params.messages],
            temperature=params.temperature if params.HasField("temperature") else 0.8,
            top_p=params.top_p if params.HasField("top_p") else 0.95,
            top_k=params.top_k if params.HasField("top_k") else _TOP_K,
            max_tokens=params.max_tokens if params.HasField("max_tokens") else self._default_max_tokens,
            stops=tuple(params.stop_sequences),
            seed=params.seed if params.HasField("seed") else None,
            presence_penalty=params.presence_penalty,  # unset reads 0.0: llama.cpp's "no penalty"
            frequency_penalty=params.frequency_penalty,
            json=params.response_format.type == pb.ResponseFormatType.RESPONSE_FORMAT_TYPE_JSON_OBJECT,
            cancelled=threading.Event(),
            emit=lambda item: loop.call_soon_threadsafe(queue.put_nowait, item),
            deadline=time.monotonic() + self._max_queue_wait,
        )
        done = self._engine.submit(job, self._max_queue)
        done.add_done_callback(lambda _: queue.put_nowait(("exit",)))
        waiting = True  # until the first item: the worker may not have taken the job yet
        try:
            while True:
                if waiting:
                    try:
                        item = await asyncio.wait_for(queue.get(), max(0.0, job.deadline - time.monotonic()))
                    except TimeoutError:
                        if self._engine.withdraw(job):
                            raise _overloaded("the request waited too long for this model") from None
                        waiting = False  # the worker took it just now: wait for its answer
                        continue
                    waiting = False
                else:
                    item = await queue.get()
                kind = item[0]
                if kind == "text":
                    yield svc.StreamCompletionResponse(delta=svc.ContentDelta(text=item[1]))
                elif kind == "finish":
                    _, reason, stop, prompt_tokens, completion_tokens = item
                    usage = pb.Usage(
                        prompt_tokens=prompt_tokens,
                        completion_tokens=completion_tokens,
                        total_tokens=prompt_tokens + completion_tokens,
                    )
                    choice = svc.ChoiceFinish(index=0, finish_reason=reason, stop_sequence=stop)
                    yield svc.StreamCompletionResponse(finish=svc.CompletionFinish(choices=[choice], usage=usage))
                    return
                elif kind == "error":
                    raise item[1]
                else:  # the worker ended without finishing: only possible when it raised inside llama.cpp
                    done.result()
                    raise RuntimeError("local generation ended without a finish")
        finally:
            job.cancelled.set()  # stops the worker before its next token if we were cancelled or failed
            self._engine.withdraw(job)  # a caller gone while waiting frees its place in the queue at once

    async def count_tokens(self, params: pb.CompletionParams) -> int:
        """The prompt's tokens exactly as a completion would evaluate them, counted on a thread of its own (see
        _Engine.prompt_tokens), so a count never waits behind the queue of generations."""
        messages = [_chat_message(m) for m in params.messages]
        return len(await asyncio.to_thread(self._engine.prompt_tokens, messages))


def _refuse_json_schema(model: str) -> None:
    """llama-cpp-python can turn a JSON Schema into a grammar, but not safely for a caller's schema: its converter
    expands `minItems`/`maxItems` into copies of the rule (a 10**9 would exhaust memory) and a schema it cannot
    express makes llama.cpp reject the grammar. JSON mode uses llama.cpp's own fixed grammar instead."""
    raise GatewayError(
        pb.ErrorReason.ERROR_REASON_INVALID_REQUEST,
        f"'response_format' of type 'json_schema' is not supported by the model '{model}'; use 'json_object'.",
        field="response_format",
        provider="local",
    )


class LocalBackend:
    """Loads each GGUF once, however many catalog entries name it."""

    def __init__(self) -> None:
        self._engines: dict[tuple[Path, int, int, int], _Engine] = {}

    async def provider_for(self, entry: CatalogEntry) -> LocalProvider:
        entry.check_options(_OPTIONS)
        threads = entry.option("threads", int, 1)
        context_length = entry.option("context_length", int, 2048)
        seed = entry.option("seed", int, llama_cpp.LLAMA_DEFAULT_SEED)
        default_max_tokens = entry.option("default_max_tokens", int, 0)
        max_queue = entry.option("max_queue", int, 16)
        max_queue_wait = entry.option("max_queue_wait_seconds", float, 30.0)
        if threads < 1 or context_length < 16 or default_max_tokens < 0:
            raise entry.problem("options 'threads' must be >= 1, 'context_length' >= 16 and 'default_max_tokens' >= 0")
        if max_queue < 1 or not max_queue_wait > 0:
            raise entry.problem("options 'max_queue' must be >= 1 and 'max_queue_wait_seconds' > 0")
        if not entry.model:
            raise entry.problem("'model' must be a GGUF path or pkg:<package>/<file>.gguf")
        try:
            path = resolve_model_path(entry.model)
        except FileNotFoundError as exc:
            raise entry.problem(f"cannot find the model {entry.model!r}: {exc}") from exc
        if not path.is_file():
            raise entry.problem(f"the model file {str(path)!r} does not exist")
        key = (path.resolve(), threads, context_length, seed)
        if key not in self._engines:
            try:
                self._engines[key] = _Engine(path, threads, context_length, seed)
            except ValueError as exc:
                raise entry.problem(f"cannot load {str(path)!r}: {exc}") from exc
        return LocalProvider(
            self._engines[key], default_max_tokens or None, max_queue=max_queue, max_queue_wait=max_queue_wait
        )

    async def aclose(self) -> None:
        for engine in self._engines.values():
            await asyncio.to_thread(engine.close)
        self._engines.clear()


def create_backend(env: Mapping[str, str]) -> LocalBackend:
    del env  # the local provider needs no secrets
    return LocalBackend()
