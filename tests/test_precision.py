"""bf16 autocast only where it is native and pays: the switch every training and tokenizer path uses."""

from __future__ import annotations

import pytest
import torch

from fourm import precision


def _clear() -> None:
    precision.cpu_has_native_bf16.cache_clear()
    precision.cpu_bf16_pays.cache_clear()
    precision._CHOICES.clear()


@pytest.fixture
def fresh(monkeypatch):
    _clear()
    yield monkeypatch
    monkeypatch.undo()
    _clear()


def test_env_forces_and_capability_decides(fresh):
    fresh.setenv(precision.ENV, "1")
    assert precision.autocast_dtype("cpu") is torch.bfloat16
    assert precision.autocast_dtype("cpu", wanted=False) is None
    with precision.autocast("cpu"):
        assert torch.is_autocast_enabled("cpu")
    _clear()
    fresh.setenv(precision.ENV, "0")
    assert precision.autocast_dtype("cpu") is None
    with precision.autocast("cpu"):
        assert not torch.is_autocast_enabled("cpu")
    _clear()
    fresh.delenv(precision.ENV)
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert precision.cpu_has_native_bf16() is native


def test_engine_and_tokenizer_follow_it(fresh):
    from fourm.tokenizers.image import ImageTokenizer, ImageTokenizerConfig
    from fourm.training.engine import Engine

    model = torch.nn.Linear(4, 4)
    step = precision.training_step(model, lambda i: model(torch.ones(2, 4)).sum())
    fresh.setenv(precision.ENV, "0")
    engine = Engine(model, torch.optim.SGD(model.parameters(), lr=0.1), "single")
    assert engine.choose_precision("linear", step).dtype is None and engine.autocast_dtype is None
    _clear()
    fresh.setenv(precision.ENV, "1")
    engine = Engine(model, torch.optim.SGD(model.parameters(), lr=0.1), "single")
    assert engine.choose_precision("linear", step).dtype is torch.bfloat16 and engine.autocast_dtype is torch.bfloat16
    assert Engine(model, torch.optim.SGD(model.parameters(), lr=0.1), "single", bf16=False).choose_precision("linear", step).dtype is None
    tok = ImageTokenizer(ImageTokenizerConfig(modality="rgb", channels=[8, 16, 16])).eval()
    raw = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    ids_bf16, _ = tok.encode(raw)
    _clear()
    fresh.setenv(precision.ENV, "0")
    ids_fp32, _ = tok.encode(raw)
    assert ids_bf16.shape == ids_fp32.shape == (2, 64)
    assert (ids_bf16 == ids_fp32).float().mean() > 0.5  # the same codes up to bf16 rounding near boundaries


def test_native_bf16_is_used_only_where_a_matmul_probe_finds_it_faster(fresh):
    fresh.delenv(precision.ENV, raising=False)
    fresh.setattr(precision, "cpu_has_native_bf16", lambda: True)
    for fp32, bf16, expected in ((6.0, 1.0, torch.bfloat16), (1.0, 1.9, None), (1.0, 1.0, None)):  # AMX-like, AVX512-BF16 alone, a tie
        fresh.setattr(precision, "matmul_seconds", lambda dtypes, fp32=fp32, bf16=bf16, **_: [fp32 if dt == torch.float32 else bf16 for dt in dtypes])
        precision.cpu_bf16_pays.cache_clear()
        assert precision.autocast_dtype("cpu") is expected, (fp32, bf16)
    fresh.setattr(precision, "cpu_has_native_bf16", lambda: False)
    fresh.setattr(precision, "matmul_seconds", lambda dtypes, **_: pytest.fail("no probe without native bf16"))
    precision.cpu_bf16_pays.cache_clear()
    assert precision.autocast_dtype("cpu") is None
    fresh.setenv(precision.ENV, "1")
    precision.cpu_bf16_pays.cache_clear()
    assert precision.autocast_dtype("cpu") is torch.bfloat16
    fresh.undo()
    assert precision.matmul_seconds([torch.float32], n=64, repeats=2)[0] > 0


def test_the_probes_dtypes_take_turns_so_a_burst_of_load_slows_both(monkeypatch):
    """A demo's probe once ran while a data loader's workers started: fp32 timed 5.3 ms (1.7 ms
    idle) and bf16, timed after, won. Taking turns, a burst over the first timings leaves each dtype
    clean rounds; timed one after the other, the first dtype saw only the burst."""
    import types

    durations = iter([5.0] * 5 + [1.0] * 100)  # the first five timings slowed by other work
    clock = {"t": 0.0, "started": False}

    def perf_counter():
        if clock["started"]:
            clock["t"] += next(durations)
        clock["started"] = not clock["started"]
        return clock["t"]

    monkeypatch.setattr(precision, "time", types.SimpleNamespace(perf_counter=perf_counter))
    assert precision.matmul_seconds([torch.float32, torch.bfloat16], n=8, repeats=5) == [1.0, 1.0]


def test_forcing_fp32_does_not_change_what_the_hardware_is_said_to_have(fresh, caplog):
    native = precision.cpu_has_native_bf16()
    fresh.setenv(precision.ENV, "0")
    _clear()
    precision._warn_once.cache_clear()
    with caplog.at_level("WARNING", logger="fourm.precision"):
        assert precision.autocast_dtype("cpu") is None
    assert precision.cpu_has_native_bf16() is native  # the hardware's answer, whatever the override
    assert "FOURM_CPU_BF16=0" in caplog.text and "no native" not in caplog.text
    precision._warn_once.cache_clear()


class FakeClock:
    """A timer whose steps take the seconds the test says: ``step(dtype)`` advances it by
    ``cost[dtype]`` (and by ``burst`` for the first ``burst_steps`` steps)."""

    def __init__(self, fp32: float, bf16: float, burst: float = 0.0, burst_steps: int = 0):
        self.t, self.cost, self.burst, self.left, self.calls = 0.0, {None: fp32, torch.bfloat16: bf16}, burst, burst_steps, []

    def __call__(self) -> float:
        return self.t

    def step(self, dtype, i) -> None:
        self.calls.append((dtype, i))
        self.t += self.cost[dtype] + (self.burst if self.left > 0 else 0.0)
        self.left -= 1


@pytest.mark.parametrize(("fp32", "bf16", "expected"), [
    (0.30, 0.10, torch.bfloat16),  # AMX: the real step three times as fast
    (0.30, 0.41, None),  # AVX512-BF16 alone: a faster matmul, a slower step (issue 31's EPYC)
    (0.30, 0.30, None),  # a tie keeps fp32's precision
])
def test_the_workload_decides_not_the_matmul(fresh, fp32, bf16, expected):
    fresh.delenv(precision.ENV, raising=False)
    fresh.setattr(precision, "cpu_has_native_bf16", lambda: True)
    fresh.setattr(precision, "matmul_seconds", lambda *a, **k: pytest.fail("the matmul probe is not asked when the step is timed"))
    clock = FakeClock(fp32, bf16)
    choice = precision.choose_autocast("cpu", True, "w", clock.step, rounds=3, timer=clock)
    assert choice.dtype is expected and choice.reason == "timed"
    assert (choice.fp32_s, choice.bf16_s) == pytest.approx((fp32, bf16))
    # a warm-up each on batch 0, then three rounds taking turns, each round on a batch not seen before
    assert clock.calls == [(None, 0), (torch.bfloat16, 0), (None, 1), (torch.bfloat16, 1), (None, 2), (torch.bfloat16, 2), (None, 3), (torch.bfloat16, 3)]
    assert "ms in bf16 against" in choice.describe()
    # cached per workload: asked again, nothing is timed; another workload is timed anew
    assert precision.choose_autocast("cpu", True, "w", pytest.fail, timer=clock) is choice
    other = FakeClock(0.3, 0.1 if expected is None else 0.9)
    assert precision.choose_autocast("cpu", True, "w2", other.step, timer=other).dtype is (torch.bfloat16 if expected is None else None)


def test_a_burst_of_load_does_not_decide(fresh):
    """Medians of turns: other work slowing the first few steps (whichever dtype they were) moves neither."""
    fresh.delenv(precision.ENV, raising=False)
    fresh.setattr(precision, "cpu_has_native_bf16", lambda: True)
    clock = FakeClock(0.30, 0.20, burst=1.0, burst_steps=3)  # warm-ups and the first fp32 timing slowed
    choice = precision.choose_autocast("cpu", True, "burst", clock.step, rounds=3, timer=clock)
    assert choice.fp32_s == pytest.approx(0.30) and choice.bf16_s == pytest.approx(0.20) and choice.dtype is torch.bfloat16


def test_what_is_not_timed(fresh):
    fresh.setattr(precision, "cpu_has_native_bf16", lambda: False)
    fresh.delenv(precision.ENV, raising=False)
    assert precision.choose_autocast("cpu", True, "x", pytest.fail).reason == "no native bf16"
    assert precision.choose_autocast("cpu", False, "x", pytest.fail).dtype is None
    fresh.setenv(precision.ENV, "1")
    assert precision.choose_autocast("cpu", True, "x", pytest.fail).dtype is torch.bfloat16
    fresh.setattr(precision, "cpu_has_native_bf16", lambda: True)
    fresh.setenv(precision.ENV, "0")
    assert precision.choose_autocast("cpu", True, "x", pytest.fail).dtype is None


def test_a_probe_step_changes_nothing_that_follows():
    """The probe's forward + backward leaves no gradient, no buffer change, no RNG draw behind."""
    torch.manual_seed(0)

    class Noisy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
            self.register_buffer("ema", torch.zeros(4))

        def forward(self, x):
            y = self.lin(x + torch.rand_like(x))
            self.ema.add_(y.detach().float().mean(0))
            return y.float().pow(2).mean()

    model = Noisy()
    before = torch.get_rng_state()
    step = precision.training_step(model, lambda i: model(torch.ones(3, 4) * i))
    step(None, 0)
    step(torch.bfloat16, 1)
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(model.ema, torch.zeros(4))
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("chosen, fp32_s, bf16_s, kept", [
    (torch.bfloat16, 3.0, 4.0, None),  # the probe chose bf16, the run's steps say fp32
    (None, 4.0, 3.0, torch.bfloat16),  # the probe chose fp32, the run's steps say bf16
    (torch.bfloat16, 3.0, 2.0, torch.bfloat16),
    (None, 3.0, 2.95, None),  # within WORKLOAD_PAYS: fp32 kept
])
def test_the_runs_own_steps_confirm_or_overturn_the_probe(chosen, fp32_s, bf16_s, kept):
    trial = precision.StepTrial(chosen, settle=2, block=3, blocks=4)
    ran = []
    while not trial.decided:
        dtype = trial.dtype()
        ran.append(dtype)
        # seconds per token: tokens vary per step, the per-token cost is the dtype's
        tokens = 100 + 10 * len(ran)
        trial.record((fp32_s if dtype is None else bf16_s) * tokens, tokens)
    other = None if chosen is torch.bfloat16 else torch.bfloat16
    # settle in the chosen dtype, then blocks alternating, the other first
    assert ran == [chosen] * 2 + [other] * 3 + [chosen] * 3 + [other] * 3 + [chosen] * 3
    assert trial.dtype() is kept
    assert trial.medians() == pytest.approx((fp32_s, bf16_s))
    trial.record(1e9, 1)  # after the decision, nothing changes it
    assert trial.dtype() is kept and trial.medians() == pytest.approx((fp32_s, bf16_s))


def test_a_burst_of_load_in_one_block_does_not_overturn_the_trial():
    trial = precision.StepTrial(None, settle=0, block=4, blocks=4)
    step = 0
    while not trial.decided:
        dtype = trial.dtype()
        seconds = 2.0 if dtype is torch.bfloat16 else 3.0
        if step in (0, 1, 2):  # a burst of load slowing three bf16 steps of the first block...
            seconds = 9.0
        trial.record(seconds, 1)
        step += 1
    assert trial.dtype() is torch.bfloat16  # ...leaves the median over both bf16 blocks at 2.0


def test_a_step_trial_needs_sensible_sizes():
    for bad in ({"settle": -1}, {"block": 0}, {"blocks": 3}, {"blocks": 0}):
        with pytest.raises(ValueError, match="step trial needs"):
            precision.StepTrial(None, **bad)
