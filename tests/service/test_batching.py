"""Dynamic batching: coalesced runs equal single runs, nothing is mixed up or lost, failures stay local.

The model runs go through `Batcher` threads; the tests drive them with many concurrent requests of
different sizes, through `Model` directly and through the app, and with stand-in run functions for the
failure and threading cases.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.config import Settings
from service.main import create_app
from service.model_card import ModelCard
from service.runtime import _PROBE_EVERY as PROBE_EVERY
from service.runtime import Batcher, Batching, Floats, Graph, Model, load_model
from service.schemas import EncodeResponse, SampleResponse
from tests.service.helpers import body, digit_png, files

# Batched and single runs may take different kernels for different batch sizes (a different order of the
# float32 sums), so results may differ in the last bits: well below 1e-6 for values of order 1.
ATOL = 1e-6
# Long enough that requests started together always join one run, even on a loaded machine.
GATHER_S = 0.2


@pytest.fixture
def batching(settings: Settings) -> Iterator[Model]:
    """The default model with batching on; requests wait up to GATHER_S for each other."""
    model = load_model(
        settings.model_copy(
            update={"batching": True, "batch_max_size": 64, "batch_max_delay_us": int(GATHER_S * 1e6)}
        )
    )
    yield model
    model.close()


@pytest.fixture
def single(settings: Settings) -> Model:
    """The same model with batching off: every run inline, alone."""
    return load_model(settings.model_copy(update={"batching": False}))


def recorded(model: Model) -> tuple[Model, list[tuple[str, int, int]]]:
    """`model` with an observer recording (graph, rows, thread id) of each run."""
    runs: list[tuple[str, int, int]] = []

    def observe(graph: str, rows: int, seconds: float) -> None:
        runs.append((graph, rows, threading.get_ident()))

    return replace(model, observer=observe), runs


def images(card: ModelCard, rows: int, seed: int) -> Floats:
    return np.random.default_rng(seed).uniform(size=(rows, *card.input_shape)).astype(np.float32)


def latents(card: ModelCard, rows: int, seed: int) -> Floats:
    return np.random.default_rng(seed).standard_normal((rows, card.latent_dim)).astype(np.float32)


def test_settings_switch_batching(settings: Settings) -> None:
    on = load_model(settings.model_copy(update={"batch_max_size": 8, "batch_max_delay_us": 250}))
    assert on.batching == Batching(max_size=8, max_delay=250e-6)
    assert load_model(settings.model_copy(update={"batching": False})).batching is None
    on.close()


def test_coalesced_runs_equal_single_runs(batching: Model, single: Model, card: ModelCard) -> None:
    model, runs = recorded(batching)
    sizes = [1, 3, 1, 7, 2, 5, 1, 4]
    xs = [images(card, rows, seed) for seed, rows in enumerate(sizes)]
    zs = [latents(card, rows, seed) for seed, rows in enumerate(sizes)]

    async def all_at_once() -> tuple[list[tuple[Floats, Floats]], list[Floats]]:
        encoded = asyncio.gather(*(model.encode_async(x) for x in xs))
        decoded = asyncio.gather(*(model.decode_async(z) for z in zs))
        return await encoded, await decoded

    encoded, decoded = asyncio.run(all_at_once())
    try:
        # Each graph ran once, on every row of every request.
        assert sorted((graph, rows) for graph, rows, _ in runs) == [("decoder", 24), ("encoder", 24)]
        for x, z, (mu, logvar), x_mean in zip(xs, zs, encoded, decoded, strict=True):
            expected_mu, expected_logvar = single.encode(x)
            np.testing.assert_allclose(mu, expected_mu, rtol=0, atol=ATOL)
            np.testing.assert_allclose(logvar, expected_logvar, rtol=0, atol=ATOL)
            np.testing.assert_allclose(x_mean, single.decode(z), rtol=0, atol=ATOL)
    finally:
        model.close()


def test_runs_happen_off_the_event_loop(batching: Model, card: ModelCard) -> None:
    model, runs = recorded(batching)

    async def one() -> int:
        await model.decode_async(latents(card, 2, 0))
        return threading.get_ident()

    try:
        loop_thread = asyncio.run(one())
        assert [graph for graph, _, _ in runs] == ["decoder"]
        assert runs[0][2] != loop_thread
    finally:
        model.close()


def test_without_batching_runs_are_inline(single: Model, card: ModelCard) -> None:
    model, runs = recorded(single)

    async def one() -> int:
        await model.decode_async(latents(card, 2, 0))
        return threading.get_ident()

    loop_thread = asyncio.run(one())
    assert [(graph, thread) for graph, _, thread in runs] == [("decoder", loop_thread)]


def test_many_concurrent_requests_are_neither_mixed_up_nor_lost(
    batching: Model, single: Model, card: ModelCard
) -> None:
    model, runs = recorded(batching)
    rng = np.random.default_rng(7)
    sizes = rng.integers(1, 9, size=200).tolist()

    async def run_all() -> list[Floats]:
        async def one(seed: int, rows: int) -> Floats:
            await asyncio.sleep(float(rng.uniform(0, 0.05)))  # arrivals spread over several runs
            return await model.decode_async(latents(card, rows, seed))

        return await asyncio.gather(*(one(seed, rows) for seed, rows in enumerate(sizes)))

    try:
        results = asyncio.run(run_all())
        assert len(results) == len(sizes)
        for seed, (rows, x_mean) in enumerate(zip(sizes, results, strict=True)):
            assert x_mean.shape == (rows, *card.input_shape)
            np.testing.assert_allclose(x_mean, single.decode(latents(card, rows, seed)), rtol=0, atol=ATOL)
        assert sum(rows for _, rows, _ in runs) == sum(sizes)  # every row ran exactly once
        assert len(runs) < len(sizes)  # and requests were coalesced
        assert max(rows for _, rows, _ in runs) <= 64
    finally:
        model.close()


def test_a_request_larger_than_the_batch_runs_alone(settings: Settings, card: ModelCard) -> None:
    model, runs = recorded(
        load_model(settings.model_copy(update={"batch_max_size": 4, "batch_max_delay_us": 100_000}))
    )

    async def both() -> list[Floats]:
        return await asyncio.gather(
            model.decode_async(latents(card, 3, 0)), model.decode_async(latents(card, 9, 1))
        )

    try:
        small, large = asyncio.run(both())
        assert (len(small), len(large)) == (3, 9)
        assert sorted(rows for _, rows, _ in runs) == [3, 9]
    finally:
        model.close()


def test_a_failing_input_fails_only_its_own_request(batching: Model, card: ModelCard) -> None:
    model, runs = recorded(batching)
    wrong = np.zeros((1, card.latent_dim + 1), dtype=np.float32)  # the graph refuses this shape

    async def mixed() -> list[Floats | BaseException]:
        return await asyncio.gather(
            model.decode_async(latents(card, 2, 0)),
            model.infer("decoder", wrong),
            model.decode_async(latents(card, 3, 1)),
            return_exceptions=True,
        )

    try:
        first, failed, last = asyncio.run(mixed())
        assert isinstance(first, np.ndarray) and first.shape == (2, *card.input_shape)
        assert isinstance(last, np.ndarray) and last.shape == (3, *card.input_shape)
        assert isinstance(failed, Exception) and not isinstance(failed, np.ndarray)
    finally:
        model.close()


def stand_in(run: Callable[[Floats], list[Floats]], delay_s: float = GATHER_S) -> Batcher:
    return Batcher(run, Batching(max_size=64, max_delay=delay_s), "test batcher")


def doubled(tensor: Floats) -> list[Floats]:
    if np.isnan(tensor).any():
        raise ValueError("NaN in the batch")
    return [tensor * 2]


def test_a_run_that_fails_on_one_item_is_retried_item_by_item() -> None:
    calls: list[int] = []

    def counted(tensor: Floats) -> list[Floats]:
        calls.append(len(tensor))
        return doubled(tensor)

    batcher = stand_in(counted)
    inputs = [np.full((1, 2), 1.0), np.full((1, 2), np.nan), np.full((2, 2), 3.0)]

    async def mixed() -> list[list[Floats] | BaseException]:
        return await asyncio.gather(*(batcher(x.astype(np.float32)) for x in inputs), return_exceptions=True)

    try:
        ok, failed, also_ok = asyncio.run(mixed())
    finally:
        batcher.close()
    assert calls == [4, 1, 1, 2]  # the coalesced run, then each request alone
    assert isinstance(ok, list) and np.array_equal(ok[0], np.full((1, 2), 2.0))
    assert isinstance(failed, ValueError) and str(failed) == "NaN in the batch"
    assert isinstance(also_ok, list) and np.array_equal(also_ok[0], np.full((2, 2), 6.0))


def test_the_event_loop_keeps_running_while_a_batch_runs() -> None:
    def slow(tensor: Floats) -> list[Floats]:
        time.sleep(0.3)
        return [tensor]

    batcher = stand_in(slow, delay_s=0.0)

    async def ticks_during_a_run() -> int:
        run = asyncio.ensure_future(batcher(np.zeros((1, 2), dtype=np.float32)))
        ticks = 0
        while not run.done():
            await asyncio.sleep(0.01)
            ticks += 1
        await run
        return ticks

    try:
        assert asyncio.run(ticks_during_a_run()) >= 10  # a blocked loop would count one
    finally:
        batcher.close()


def test_queued_requests_fill_a_batch_up_to_its_maximum_size() -> None:
    """Six one-row requests queued behind a run: the next run takes four (VAE_BATCH_MAX_SIZE), the last one
    comes after."""
    rows: list[int] = []
    release = threading.Event()

    def held(tensor: Floats) -> list[Floats]:
        rows.append(len(tensor))
        release.wait(5)
        return [tensor]

    batcher = Batcher(held, Batching(max_size=4, max_delay=0.0), "test batcher")

    async def queued_behind_a_run() -> None:
        first = asyncio.ensure_future(batcher(np.zeros((1, 2), dtype=np.float32)))
        while not rows:  # until it runs, on the thread
            await asyncio.sleep(0.01)
        rest = [asyncio.ensure_future(batcher(np.full((1, 2), i, dtype=np.float32))) for i in range(5)]
        await asyncio.sleep(0.05)
        release.set()
        await first
        for i, answer in enumerate(await asyncio.gather(*rest)):
            assert np.array_equal(answer[0], np.full((1, 2), i))

    try:
        asyncio.run(queued_behind_a_run())
    finally:
        release.set()
        batcher.close()
    assert rows == [1, 4, 1]


def test_a_request_waits_up_to_the_maximum_delay_for_others() -> None:
    """A second request 50 ms after the first joins its run when VAE_BATCH_MAX_DELAY_US allows 200 ms."""
    rows: list[int] = []

    def counted(tensor: Floats) -> list[Floats]:
        rows.append(len(tensor))
        return [tensor]

    batcher = stand_in(counted, delay_s=GATHER_S)

    async def one_then_another() -> None:
        first = asyncio.ensure_future(batcher(np.zeros((1, 2), dtype=np.float32)))
        await asyncio.sleep(GATHER_S / 4)
        await asyncio.gather(first, batcher(np.ones((2, 2), dtype=np.float32)))

    try:
        asyncio.run(one_then_another())
    finally:
        batcher.close()
    assert rows == [3]


def test_close_finishes_queued_runs_then_refuses() -> None:
    batcher = stand_in(doubled, delay_s=0.05)

    async def queued_then_closed() -> list[Floats]:
        pending = asyncio.ensure_future(batcher(np.ones((1, 2), dtype=np.float32)))
        await asyncio.sleep(0)  # queued
        await asyncio.get_running_loop().run_in_executor(None, batcher.close)
        (result,) = await pending
        with pytest.raises(RuntimeError, match="test batcher is closed"):
            await batcher(np.ones((1, 2), dtype=np.float32))
        return [result]

    (result,) = asyncio.run(queued_then_closed())
    assert np.array_equal(result, np.full((1, 2), 2.0))


def app_answers(settings: Settings, requests: list[tuple[str, int]]) -> list[tuple[Floats, Floats]]:
    """Each request's (latents, images) or (mu, logvar), sent 32 at a time to one app.

    ("/sample", seed) samples 1 + seed % 7 images; ("/encode", seed) uploads 1 + seed % 4 digits from `seed`.
    """

    def send(client: TestClient, request: tuple[str, int]) -> tuple[Floats, Floats]:
        path, seed = request
        if path == "/sample":
            sampled = body(client.get(f"/sample?n={1 + seed % 7}&seed={seed}&format=array"), SampleResponse)
            return np.asarray(sampled.latents), np.asarray(sampled.images)
        upload = files(*(digit_png(seed + i) for i in range(1 + seed % 4)))
        encoded = body(client.post("/encode", files=upload), EncodeResponse)
        return np.asarray(encoded.mu), np.asarray(encoded.logvar)

    with TestClient(create_app(settings)) as client, ThreadPoolExecutor(max_workers=32) as pool:
        return list(pool.map(lambda request: send(client, request), requests))


def test_app_requests_of_different_sizes_and_seeds_get_their_own_answers(settings: Settings) -> None:
    requests = [("/sample", seed) for seed in range(96)] + [("/encode", seed) for seed in range(32)]
    coalescing = settings.model_copy(update={"batching": True, "batch_max_delay_us": 2000})
    batched = app_answers(coalescing, requests)
    single = app_answers(settings.model_copy(update={"batching": False}), requests)
    for (got_first, got_second), (first, second) in zip(batched, single, strict=True):
        assert got_first.shape == first.shape and got_second.shape == second.shape
        np.testing.assert_allclose(got_first, first, rtol=0, atol=ATOL)
        np.testing.assert_allclose(got_second, second, rtol=0, atol=ATOL)


def test_requests_one_at_a_time_run_inline_with_a_probe_through_the_thread() -> None:
    threads: list[int] = []

    def noted(tensor: Floats) -> list[Floats]:
        threads.append(threading.get_ident())
        return [tensor]

    batcher = stand_in(noted, delay_s=0.0)
    every = PROBE_EVERY

    async def one_at_a_time_then_together() -> tuple[int, list[int]]:
        for _ in range(4 * every):
            await batcher(np.zeros((1, 2), dtype=np.float32))
        await asyncio.gather(*(batcher(np.zeros((1, 2), dtype=np.float32)) for _ in range(3 * every)))
        return threading.get_ident(), threads[4 * every :]

    try:
        loop_thread, together = asyncio.run(one_at_a_time_then_together())
    finally:
        batcher.close()
    sequential = threads[: 4 * every]
    # The first `every` went through the thread; then one in `every` (a probe) did, the others ran inline.
    probes = [i for i, thread in enumerate(sequential) if thread != loop_thread]
    assert probes == [*range(every), 2 * every - 1, 3 * every - 1, 4 * every - 1]
    # Together: at most the runs before the next probe stayed inline; once it is out, all go to the thread.
    inline = [i for i, thread in enumerate(together) if thread == loop_thread]
    assert inline == list(range(len(inline))) and len(inline) < every
    assert len(together) < 3 * every  # the rest were coalesced


def test_a_run_that_does_not_return_is_reported_until_it_does() -> None:
    release = threading.Event()

    def hung(tensor: Floats) -> list[Floats]:
        release.wait(10)
        return [tensor]

    batcher = stand_in(hung, delay_s=0.0)

    async def hang_then_release() -> tuple[str | None, str | None, list[Floats]]:
        run = asyncio.ensure_future(batcher(np.zeros((1, 2), dtype=np.float32)))
        await asyncio.sleep(0.3)
        early, late = batcher.stalled(after=5.0), batcher.stalled(after=0.1)
        release.set()
        return early, late, await run

    try:
        early, late, result = asyncio.run(hang_then_release())
        assert early is None  # running, but for less than `after`
        assert late is not None and re.fullmatch(
            r"the test batcher's run began \d+ s ago and has not returned \(VAE_STALL_TIMEOUT: 0.1 s\)", late
        )
        assert result[0].shape == (1, 2) and batcher.stalled(after=0.1) is None
    finally:
        release.set()
        batcher.close()


# pytest reports the thread's end as a warning, which this suite turns into an error.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_batching_thread_that_died_is_reported() -> None:
    def fatal(tensor: Floats) -> list[Floats]:
        raise SystemExit  # not an Exception: it ends the thread, as no failing run should

    batcher = stand_in(fatal, delay_s=0.0)

    async def never_answered() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(batcher(np.zeros((1, 2), dtype=np.float32)), timeout=0.5)

    assert batcher.stalled(after=30.0) is None  # no thread yet
    asyncio.run(never_answered())
    assert batcher.stalled(after=30.0) == "the test batcher's thread has stopped"
    batcher.close()
    assert batcher.stalled(after=30.0) is None  # stopped on purpose


def test_probes_answer_503_while_a_model_run_hangs(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that never returns (a hung GPU) would leave every later request waiting: liveness and readiness
    fail after VAE_STALL_TIMEOUT, so that the orchestrator restarts the process, and recover if it returns.
    The other model's own readiness stays: its requests are still answered."""
    release = threading.Event()
    run = Model.run

    def hung(self: Model, graph: Graph, tensor: Floats) -> list[Floats]:
        if graph == "decoder":
            release.wait(10)
        return run(self, graph, tensor)

    probes = ("/health", "/ready", "/v2/health/live", "/v2/health/ready", "/v2/models/decoder/ready")
    with TestClient(create_app(settings.model_copy(update={"stall_timeout": 0.2}))) as client:
        monkeypatch.setattr(Model, "run", hung)
        with ThreadPoolExecutor(max_workers=1) as pool:
            waiting = pool.submit(client.get, "/sample?n=1")
            try:
                time.sleep(0.5)
                for probe in probes:
                    response = client.get(probe)
                    assert response.status_code == 503, probe
                    problem = response.json()["error" if probe.startswith("/v2") else "detail"]
                    assert problem.startswith("the decoder batcher's run began"), problem
                    assert problem.endswith("(VAE_STALL_TIMEOUT: 0.2 s)")
                assert client.get("/v2/models/encoder/ready").status_code == 200
                assert client.post("/encode", files=files(digit_png(0))).status_code == 200
            finally:
                release.set()
            assert waiting.result().status_code == 200
        for probe in probes:
            assert client.get(probe).status_code == 200, probe


def test_shutdown_does_not_wait_for_a_run_that_has_stalled(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Closing the model waits for the runs in progress to finish (up to 5 s a thread), but not for one past
    VAE_STALL_TIMEOUT: a process restarted for a hung run must not spend its grace period on it."""
    release = threading.Event()

    def hung(self: Model, graph: Graph, tensor: Floats) -> list[Floats]:
        release.wait(10)
        return [tensor]

    model = load_model(settings.model_copy(update={"batching": True}))
    monkeypatch.setattr(Model, "run", hung)

    async def stall() -> float:
        pending = asyncio.ensure_future(model.decode_async(np.zeros((1, 16), dtype=np.float32)))
        await asyncio.sleep(0.3)
        assert model.stalled(0.1) is not None
        start = time.monotonic()
        model.close(stall_timeout=0.1)
        pending.cancel()
        return time.monotonic() - start

    try:
        assert asyncio.run(stall()) < 2.0
    finally:
        release.set()
