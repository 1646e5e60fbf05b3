"""The output processor: kept tokens, finish reasons, incremental text, stop strings held back."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from core.sampling import SamplingParams
from scheduler.output import OutputProcessor
from scheduler.request import RequestState
from tests.scheduler.fakes import EOS, make_request

SHIPPED = Path(__file__).resolve().parents[2] / "checkpoints" / "tiny-target"


def byte_text(ids: Sequence[int]) -> str:
    """Each token one byte (ids 0-255; EOS decodes to nothing): UTF-8 characters span tokens."""
    return bytes(i for i in ids if i != EOS).decode("utf-8", errors="replace")


def request(max_tokens: int = 100, stop: tuple[str, ...] = (), ignore_eos: bool = False) -> RequestState:
    req = make_request(0, num_prompt=4, max_tokens=max_tokens, ignore_eos=ignore_eos)
    req.sampling = SamplingParams(max_tokens=max_tokens, stop=stop, ignore_eos=ignore_eos)
    return req


def stream(
    processor: OutputProcessor,
    req: RequestState,
    steps: Sequence[str | list[int]],
    finished: list[str] | None = None,
) -> list[str]:
    """Emit each step's tokens (a str is its UTF-8 bytes); the text deltas, up to the finish,
    whose reason goes into ``finished``."""
    deltas = []
    for tokens in steps:
        ids = list(tokens.encode()) if isinstance(tokens, str) else tokens
        emission = processor.emit(req, ids)
        deltas.append(emission.text)
        if emission.finish_reason is not None:
            if finished is not None:
                finished.append(emission.finish_reason)
            break
    return deltas


def test_text_arrives_as_deltas_that_join_to_the_whole_text() -> None:
    processor, req = OutputProcessor(byte_text), request()
    assert stream(processor, req, ["Hel", "lo", " world"]) == ["Hel", "lo", " world"]
    assert processor.completion(req, "stop").text == "Hello world"


def test_a_character_cut_between_steps_waits_for_its_last_byte() -> None:
    processor, req = OutputProcessor(byte_text), request()
    euro = "€".encode()  # three bytes
    steps = [list(b"a"), [euro[0]], [euro[1]], [euro[2], *b"b"]]
    assert stream(processor, req, steps) == ["a", "", "", "€b"]  # never a replacement character


def test_an_end_of_turn_token_is_kept_and_ends_the_request() -> None:
    processor, req = OutputProcessor(byte_text), request()
    emission = processor.emit(req, [*b"ok", EOS, *b"after"])
    assert (emission.token_ids, emission.text, emission.finish_reason) == ((*b"ok", EOS), "ok", "stop")


def test_ignore_eos_keeps_going_past_the_end_of_turn() -> None:
    processor, req = OutputProcessor(byte_text), request(ignore_eos=True)
    emission = processor.emit(req, [*b"ok", EOS, *b"on"])
    assert (emission.text, emission.finish_reason) == ("okon", None)


def test_max_tokens_cuts_the_tokens_and_ends_with_length() -> None:
    processor, req = OutputProcessor(byte_text), request(max_tokens=5)
    assert processor.emit(req, list(b"abc")).finish_reason is None
    emission = processor.emit(req, list(b"defgh"))
    assert (emission.token_ids, emission.text, emission.finish_reason) == (tuple(b"de"), "de", "length")
    assert req.output_ids == list(b"abcde")


def test_an_end_of_turn_past_max_tokens_is_a_length_finish() -> None:
    processor, req = OutputProcessor(byte_text), request(max_tokens=2)
    emission = processor.emit(req, [*b"ab", EOS])
    assert (emission.token_ids, emission.finish_reason) == (tuple(b"ab"), "length")


def test_a_stop_string_ends_the_text_before_it() -> None:
    processor, req = OutputProcessor(byte_text), request(stop=("END",))
    finished: list[str] = []
    assert stream(processor, req, ["one ", "two END three"], finished) == ["one ", "two "]
    assert finished == ["stop"]
    assert processor.completion(req, "stop").text == "one two "


def test_a_stop_string_spanning_steps_is_never_half_streamed() -> None:
    processor, req = OutputProcessor(byte_text), request(stop=("STOP",))
    deltas = stream(processor, req, ["go S", "T", "OP now"])
    assert deltas == ["go ", "", ""]
    assert "".join(deltas) == processor.completion(req, "stop").text == "go "


def test_held_text_that_turns_out_not_to_be_a_stop_string_is_released() -> None:
    processor, req = OutputProcessor(byte_text), request(stop=("STOP",))
    assert stream(processor, req, ["go ST", "ART"]) == ["go ", "START"]


def test_held_text_is_released_when_the_request_ends_otherwise() -> None:
    processor, req = OutputProcessor(byte_text), request(max_tokens=4, stop=("STOP",))
    finished: list[str] = []
    assert stream(processor, req, ["ab", "ST"], finished) == ["ab", "ST"]
    assert finished == ["length"]


def test_the_earliest_of_several_stop_strings_wins() -> None:
    processor, req = OutputProcessor(byte_text), request(stop=("zz", "b"))
    assert stream(processor, req, ["aazzb"]) == ["aa"]


def test_without_a_detokenizer_only_tokens_flow() -> None:
    processor, req = OutputProcessor(), request(max_tokens=3)
    emission = processor.emit(req, [5, 6, 7])
    assert (emission.token_ids, emission.text, emission.finish_reason) == ((5, 6, 7), "", "length")


def test_completion_times_count_from_arrival_to_first_and_last_token() -> None:
    clock = iter([10.0, 12.5])
    processor, req = OutputProcessor(byte_text, clock=lambda: next(clock)), request()
    req.arrived_s = 9.0
    processor.emit(req, list(b"x"))  # first token at 10.0
    done = processor.completion(req, "stop")  # now 12.5
    assert (done.ttft_s, done.time_s) == (1.0, 3.5)


def test_incremental_text_of_the_shipped_tokenizer_equals_decoding_it_whole() -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SHIPPED, local_files_only=True)

    def decode(ids: Sequence[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    rng = random.Random(0)
    words = [
        "the",
        "red",
        "circle",
        "is",
        "above",
        "a",
        "small",
        "blue",
        "square",
        ",",
        "and",
        "3",
        "shapes",
        ":",
        "é",
        "ü",
        "🙂",
        "!",
        "?",
    ]
    for case in range(40):
        ids = tokenizer.encode(" ".join(rng.choice(words) for _ in range(rng.randint(1, 30))))
        ids += [rng.randrange(len(tokenizer)) for _ in range(rng.randint(0, 6))]  # arbitrary tokens too
        processor, req = OutputProcessor(decode), request(max_tokens=len(ids))
        cuts = (
            sorted(rng.sample(range(1, len(ids)), min(len(ids) - 1, rng.randint(0, 8))))
            if len(ids) > 1
            else []
        )
        deltas = [
            processor.emit(req, ids[a:b]).text for a, b in zip([0, *cuts], [*cuts, len(ids)], strict=True)
        ]
        assert "".join(deltas) == decode(ids), case
