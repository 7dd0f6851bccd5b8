"""attnkernels.choose: algorithm choices by measurement, on a fake clock (which candidate wins,
ties, caching, static mode, the choices file, explain) and once for real (GAM's conv: the
winner runs, gives the reference's numbers, and is not measured again); the fused modules'
training choice between their fused forward and the reference's."""
from __future__ import annotations

import json

import pytest
import torch

from attnkernels import backend, choose
from attnkernels import functional as AF
from attnkernels.ops.shuffle_conv import Reference
from attnkernels.reference.registry import names as registry_names


@pytest.fixture(autouse=True)
def fresh(monkeypatch, tmp_path):
    """Measure mode, no choices file, no choices remembered, before and after each test."""
    monkeypatch.setenv(choose.ENV_MODE, "measure")
    monkeypatch.delenv(choose.ENV_FILE, raising=False)
    choose.clear()
    yield
    choose.clear()


def timer(times: dict[str, float]):
    """A fake `measure`: candidate -> seconds, counting the calls."""
    calls: list[str] = []

    def measure(name: str) -> float:
        calls.append(name)
        return times[name]

    measure.calls = calls
    return measure


CANDIDATES = ("direct", "library", "eager")


def test_the_fastest_candidate_wins_and_is_remembered():
    measure = timer({"direct": 3e-3, "library": 1e-3, "eager": 2e-3})
    assert choose.choose("site", (1, 2), CANDIDATES, "direct", measure) == "library"
    # A warm-up run each, then interleaved rounds: cheap candidates get MAX_ROUNDS of them.
    assert measure.calls == list(CANDIDATES) * (1 + choose.MAX_ROUNDS)
    # Same key: no second measurement, even if the clock would now say otherwise.
    slower = timer({"direct": 1e-3, "library": 9e-3, "eager": 9e-3})
    assert choose.choose("site", (1, 2), CANDIDATES, "direct", slower) == "library"
    assert slower.calls == []
    # Another key, another site: measured on their own.
    assert choose.choose("site", (1, 3), CANDIDATES, "direct", slower) == "direct"
    assert choose.choose("other", (1, 2), CANDIDATES, "direct", slower) == "direct"
    assert len(slower.calls) == 2 * len(CANDIDATES) * (1 + choose.MAX_ROUNDS)


def test_ties_go_to_the_earlier_candidate():
    assert choose.choose("site", (), CANDIDATES, "library", timer(dict.fromkeys(CANDIDATES, 1e-3))) == "direct"
    assert choose.choose("site", (0,), ("library", "direct"), "library", timer(dict.fromkeys(CANDIDATES, 1e-3))) \
        == "library"


def test_static_mode_never_measures(monkeypatch):
    measure = timer({"direct": 3e-3, "library": 1e-3, "eager": 2e-3})
    with choose.mode("static"):
        assert choose.choose("site", (), CANDIDATES, "eager", measure) == "eager"
    monkeypatch.setenv(choose.ENV_MODE, "static")
    assert choose.choose("site", (), CANDIDATES, "direct", measure) == "direct"
    assert measure.calls == []
    # ... and in static mode even a remembered measured choice gives way to the static rule.
    monkeypatch.setenv(choose.ENV_MODE, "measure")
    assert choose.choose("site", (), CANDIDATES, "direct", measure) == "library"
    monkeypatch.setenv(choose.ENV_MODE, "static")
    assert choose.choose("site", (), CANDIDATES, "direct", measure) == "direct"


def test_not_measurable_takes_the_static_rule_and_remembers_nothing():
    measure = timer({"direct": 3e-3, "library": 1e-3, "eager": 2e-3})
    assert choose.choose("site", (), CANDIDATES, "eager", measure, can_measure=False) == "eager"
    assert measure.calls == []
    assert choose.decide("site", (), CANDIDATES, "eager") == "eager"
    assert choose.choose("site", (), CANDIDATES, "eager", measure) == "library"
    assert choose.decide("site", (), CANDIDATES, "eager") == "library"  # what a compiled graph bakes in


def test_pick_answers_a_known_key_without_measuring(monkeypatch):
    """pick's fast path: after the first call for a key, the winner is returned with no
    measurement; static mode still wins over it; clear() forgets it; a call that could not
    measure (fake tensors) takes the static rule and leaves the key to the next real call."""
    times = {"a": 3e-3, "b": 1e-3, "eager": 2e-3}
    calls: list[str] = []

    def fake_measure(name, fn, args, prepared):
        calls.append(name)
        return times[name]

    monkeypatch.setattr(choose, "measure_candidate", fake_measure)
    runs = {name: (lambda name=name: lambda *a: name)() for name in times}
    x = torch.randn(2, 3)
    with torch._subclasses.fake_tensor.FakeTensorMode() as fake_mode:
        fake_x = fake_mode.from_tensor(x)
    assert choose.pick("site", (7,), runs, "a", (fake_x,))() == "a"
    assert calls == []
    assert choose.pick("site", (7,), runs, "a", (x,))() == "b"
    measured = len(calls)
    assert measured == len(times) * (1 + choose.MAX_ROUNDS)
    assert choose.pick("site", (7,), runs, "a", (x,))() == "b"
    assert len(calls) == measured
    with choose.mode("static"):
        assert choose.pick("site", (7,), runs, "a", (x,))() == "a"
    with pytest.raises(ValueError, match="the static choice 'c' is not a candidate"):
        choose.pick("site", (7,), runs, "c", (x,))
    choose.clear()
    assert choose.pick("site", (7,), runs, "a", (x,))() == "b"
    assert len(calls) == 2 * measured


def test_known_winner_is_a_lookup_only_where_pick_name_would_answer_by_one(monkeypatch):
    """The fast path every choice site takes before building its candidates: a winner chosen
    before for the key, and nothing else (static mode, an unknown key, another site, a static
    rule or winner not among the names, all fall through to `pick_name`)."""
    names = ("a", "b")
    assert choose.known_winner("site", (1,), names, "a") is None
    assert choose.pick_name("site", (1,), names, "a", timer({"a": 2e-3, "b": 1e-3}), lambda: True) == "b"
    assert choose.known_winner("site", (1,), names, "a") == "b"
    assert choose.known_winner("site", (2,), names, "a") is None
    assert choose.known_winner("other", (1,), names, "a") is None
    assert choose.known_winner("site", (1,), ("a",), "a") is None
    assert choose.known_winner("site", (1,), names, "c") is None
    with choose.mode("static"):
        assert choose.known_winner("site", (1,), names, "a") is None
    # pick_setting takes the same fast path: no second measurement, the value as an int.
    calls: list[int] = []

    def fake_clock(site, value, run, device):
        calls.append(value)
        return {8: 2e-3, 4: 1e-3}[value]

    monkeypatch.setattr(choose, "measure_setting", fake_clock)
    x = torch.randn(2)
    assert choose.pick_setting("tiles", (3,), [8, 4], 8, lambda v: None, (x,)) == 4
    measured = len(calls)
    assert choose.pick_setting("tiles", (3,), [8, 4], 8, lambda v: None, (x,)) == 4
    assert len(calls) == measured


def test_bad_mode_and_bad_static_are_named(monkeypatch):
    monkeypatch.setenv(choose.ENV_MODE, "fast")
    with pytest.raises(ValueError, match="ATTNKERNELS_CHOOSE must be one of measure, static; got 'fast'"):
        choose.current_mode()
    with pytest.raises(ValueError, match=r"choose.mode\(name\) must be one of"):
        with choose.mode("always"):
            pass
    monkeypatch.setenv(choose.ENV_MODE, "measure")
    with pytest.raises(ValueError, match="static choice 'cudnn' is not a candidate"):
        choose.choose("site", (), CANDIDATES, "cudnn", timer({}))


def test_choices_file_is_written_per_machine_and_read_back(monkeypatch, tmp_path):
    path = tmp_path / "choices.json"
    path.write_text(json.dumps({"another machine": {"site|9": {"winner": "eager", "times_ms": {}}}}))
    monkeypatch.setenv(choose.ENV_FILE, str(path))
    assert choose.choose("site", (7, torch.float32), CANDIDATES, "direct",
                         timer({"direct": 3e-3, "library": 2e-3, "eager": 1e-3})) == "eager"
    data = json.loads(path.read_text())
    assert set(data) == {"another machine", choose.machine()}
    assert data[choose.machine()] == {"site|7 float32": {"winner": "eager",
                                                         "times_ms": {"direct": 3.0, "library": 2.0, "eager": 1.0}}}
    choose.clear()  # a new process: the file's choice is used, nothing measured
    measure = timer({"direct": 1e-3, "library": 2e-3, "eager": 3e-3})
    assert choose.choose("site", (7, torch.float32), CANDIDATES, "direct", measure) == "eager"
    assert measure.calls == []
    assert choose.choose("site", (9,), CANDIDATES, "direct", measure) == "direct"  # not this machine's
    path.write_text("{not json")
    choose.clear()
    with pytest.raises(RuntimeError, match="is not a readable choices file"):
        choose.choose("site", (8,), CANDIDATES, "direct", measure)


def test_explain_lists_choices_with_their_times():
    assert "none made yet" in choose.explain()
    choose.choose("shuffle_conv", ("cpu", 4), CANDIDATES, "direct", timer({"direct": 3e-3, "library": 1e-3,
                                                                            "eager": 2e-3}))
    text = choose.explain()
    assert "mode: measure" in text
    assert "shuffle_conv [cpu 4]: library (measured: direct 3 ms, library 1 ms, eager 2 ms)" in text
    assert text in backend.explain("cpu")


def test_pick_setting_measures_values_on_the_callers_arguments(monkeypatch):
    """pick_setting: duplicate values are measured once; the fastest value wins, a tie goes to
    the earlier value (the rule's, listed first); the winner is kept per key; static mode and
    fake tensors give the rule's value without measuring; made() lists the choice."""
    times = {128: 2e-3, 64: 1e-3, 32: 1e-3}
    ran: list[int] = []

    def fake_clock(site, value, run, device):
        run(value)
        return times[value]

    monkeypatch.setattr(choose, "measure_setting", fake_clock)
    x = torch.randn(3)
    pick = lambda static, values: choose.pick_setting("tile", (3,), values, static, ran.append, (x,))  # noqa: E731
    with choose.mode("static"):
        assert pick(128, [128, 64, 32]) == 128 and ran == []
    with torch._subclasses.fake_tensor.FakeTensorMode() as fake_mode:
        fake_x = fake_mode.from_tensor(x)
    assert choose.pick_setting("tile", (3,), [128, 64], 128, ran.append, (fake_x,)) == 128 and ran == []
    assert pick(128, [128, 64, 128, 32]) == 64  # 64 and 32 tie: the earlier wins
    assert sorted(set(ran)) == [32, 64, 128] and len(ran) == 3 * (1 + choose.MAX_ROUNDS)
    ran.clear()
    assert pick(128, [128, 64, 32]) == 64 and ran == []
    assert [(c.site, c.key, c.winner) for c in choose.made()] == [("tile", "3", "64")]


def test_slow_candidates_get_fewer_rounds_and_the_median_decides():
    """Runs of 0.3 s: the budget is spent after MIN_ROUNDS; one outlier round does not decide."""
    times = {"a": iter([9, 0.3, 0.9, 0.3]), "b": iter([9, 0.4, 0.4, 0.4])}  # a warm-up each first
    measure = lambda name: next(times[name])  # noqa: E731
    assert choose.choose("site", (), ("b", "a"), "b", measure) == "a"  # medians 0.3 < 0.4
    assert "a 300 ms, " not in choose.explain() and "b 400 ms, a 300 ms" in choose.explain()


def test_time_once_times_one_run_after_flushing_the_cache():
    ticks = iter([1.0, 1.25])
    ran = []
    assert choose.time_once(lambda: ran.append(1), torch.device("cpu"), clock=lambda: next(ticks)) == 0.25
    assert ran == [1] and choose._flush_buffer is not None and choose._flush_buffer.numel() * 4 >= 64 << 20
    # Made under inference_mode (the benchmark's forward phase), usable outside it (its f+b).
    choose._flush_buffer = None
    with torch.inference_mode():
        choose.time_once(lambda: None, torch.device("cpu"))
    choose.time_once(lambda: None, torch.device("cpu"))


def test_forward_backward_runs_on_copies():
    x = torch.randn(3, requires_grad=True)
    seen = []

    def fn(t):
        seen.append(t)
        return (t * 2).sum()

    out = choose.forward_backward(fn, [x])()
    assert seen[0] is not x and torch.equal(seen[0], x) and x.grad is None
    assert out.requires_grad and seen[0].grad is None  # backward ran, its gradient dropped
    with torch.no_grad():
        out = choose.forward_backward(fn, [x])()
    assert not out.requires_grad  # inference: forward only


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_gam_conv_measured_for_real(grad, compiled_ops):
    """shuffle_conv's "auto" on the C++ backend: the first call measures direct, library and
    eager; the result is the reference's whichever wins; the second call does not measure."""
    torch.manual_seed(0)
    s = torch.randn(2, 8, 9, 7, dtype=torch.float64, requires_grad=grad)
    weight = torch.randn(8, 2, 7, 7, dtype=torch.float64, requires_grad=grad)
    bias = torch.randn(8, dtype=torch.float64)
    with backend.use_backend("cpu"):
        with torch.set_grad_enabled(grad):
            y = AF.shuffle_conv(s, weight, bias, 4)
            lines = [line for line in choose.explain().splitlines() if "shuffle_conv [" in line]
            assert len(lines) == 1 and "measured" in lines[0]
            assert all(f"{name} " in lines[0] for name in ("direct", "library", "eager"))
            again = AF.shuffle_conv(s, weight, bias, 4)
    torch.testing.assert_close(y, Reference.shuffle_conv(s, weight, bias, 4, 1))
    assert torch.equal(y, again)  # the same winner, the same bits
    assert choose.explain().count("shuffle_conv [") == 1
    if grad:
        (gs,) = torch.autograd.grad(y.sum(), s)
        (want,) = torch.autograd.grad(Reference.shuffle_conv(s, weight, bias, 4, 1).sum(), s)
        torch.testing.assert_close(gs, want)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_compile_fullgraph_uses_the_eager_choice(train, compiled_ops):
    """Under torch.compile nothing is measured (no graph break: `decide` is a constant to
    dynamo); a compiled GAM runs the algorithm the eager runs chose, or the static rule when
    none was made yet."""
    import copy

    from attnkernels import nn as fused

    torch._dynamo.reset()
    torch.manual_seed(0)
    module = fused.GAM(32, reduction=4, groups=4).train(train)
    x = torch.randn(2, 32, 7, 5)
    with backend.use_backend("cpu"):
        # Compiled before any choice: the static rule, nothing measured.
        torch.compile(copy.deepcopy(module), fullgraph=True)(x).sum().backward()
        assert "none made yet" in choose.explain()
        want = module(x)  # eager: measures
        made = choose.explain()
        # Training: the module's choice (fused or eager) and, inside the fused candidate, the two convs'.
        assert made.count("measured") == 3 if train else made.count("measured") >= 1
        torch._dynamo.reset()
        got = torch.compile(copy.deepcopy(module), fullgraph=True)(x)
    assert choose.explain() == made  # compiling measured nothing more
    torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("name,site,modes,candidates", [
    ("SE", "channel_mlp_attention", ("train", "inference"), ("fused", "passes", "eager")),
    ("ECA", "channel_attention", ("train", "inference"), ("fused", "passes", "eager")),
    # Module-level choices, in inference only (no autograd, no BatchNorm update to measure).
    ("HAM", "ham_attention", ("inference",), ("per_sample", "passes", "eager")),
    ("Bridge", "bridge", ("inference",), ("folded", "eager")),
    ("GAM", "gam", ("inference",), ("fused", "eager")),
    ("SoftmaxSpatial", "softmax_spatial", ("inference",), ("fused", "eager")),
    ("PAM", "pam", ("inference",), ("fused", "eager")),
    ("CSM", "pam", ("inference",), ("fused", "eager")),  # its spatial child is the fused PAM
    ("CBAM", "cbam", ("inference",), ("fused", "eager")),
    ("Triplet", "triplet", ("inference",), ("fused", "eager")),
])
def test_modules_measure_their_choice_for_real(name, site, modes, candidates, compiled_ops):
    """A fused module whose op is chosen by measurement on the C++ backend: the candidates are
    measured once per shape (the per-sample kernel, the passes, eager), the result is the
    reference module's whichever wins, and the next call repeats it bit for bit."""
    from helpers import fused_pair

    from attnkernels import nn as fused
    from attnkernels import reference as R

    f, ref = fused_pair(getattr(fused, name), getattr(R, name), 16, dtype=torch.float64, device="cpu")
    x = torch.randn(3, 16, 6, 5, dtype=torch.float64)
    for mode in modes:
        choose.clear()
        f.train(mode == "train"), ref.train(mode == "train")
        with backend.use_backend("cpu"), torch.set_grad_enabled(mode == "train"):
            y, again = f(x), f(x)
            want = ref(x)
        lines = [line for line in choose.explain().splitlines() if f"{site} [" in line]
        assert len(lines) == 1 and "measured" in lines[0], choose.explain()
        assert all(f"{c} " in lines[0] for c in candidates), lines[0]
        torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
        assert torch.equal(y, again)


@pytest.mark.parametrize("winner", ["direct+save_z", "library+save_z", "eager", "library"])
def test_gam_training_step_matches_the_reference_whichever_candidate_wins(winner, monkeypatch, compiled_ops):
    """GAM's conv2 + BN2 + gate in training: each candidate (the op, which recomputes conv2's
    output in backward; the steps with autograd saving it; eager), made the winner by a fake
    clock, gives the reference module's output, gradients and running statistics."""
    from helpers import fused_pair

    from attnkernels import nn as fused
    from attnkernels import reference as R

    measured: list[str] = []

    def fake_clock(name, fn, args, prepared):
        measured.append(name)
        if name == "fused":  # the module's own choice (fused or eager): the fused ops, whose op is this test's
            return 0.0
        return 1e-3 if name == winner else 1.0

    monkeypatch.setattr(choose, "measure_candidate", fake_clock)
    f, ref = fused_pair(fused.GAM, R.GAM, 16, dtype=torch.float64, device="cpu", reduction=4, groups=1)
    f.train(), ref.train()
    x = torch.randn(2, 16, 6, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn_like(x)
    with backend.use_backend("cpu"):
        y = f(x)
    (y * g).sum().backward()
    want = ref(x.detach().requires_grad_())
    (want * g).sum().backward()
    assert {"direct+save_z", "library+save_z"} <= set(measured)
    assert "shuffle_conv_bn_gate [" in choose.explain() and f": {winner} (measured" in choose.explain()
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
    for (name, a), b in zip(f.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-9, msg=name)
    for a, b in zip(f.buffers(), ref.buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


TRAINING_CHOICE_MODULES = [name for name in registry_names() if name != "csm"]  # CSM's children choose


@pytest.mark.parametrize("winner", ["fused", "eager"])
@pytest.mark.parametrize("name", TRAINING_CHOICE_MODULES)
def test_training_step_is_the_references_whichever_the_module_chooses(name, winner, monkeypatch, compiled_ops):
    """A fused module's training choice (`chosen_in_training`: its fused attend or the
    reference's), each candidate made the winner by a clock that runs the candidates as the
    real one does (on the copies it is given, forward and backward): the step's output,
    gradients and running statistics are the reference module's after exactly one step, so
    the measurement left no trace on the module; explain() names the choice."""
    from helpers import assert_steps_match, fused_pair, gradient_names, module_kwargs, training_step

    from attnkernels import nn as fused
    from attnkernels import reference as R

    measured: list[str] = []

    def running_clock(name, fn, args, prepared):
        measured.append(name)
        choose.forward_backward(fn, args)()
        return 1e-3 if name == winner else 1.0

    monkeypatch.setattr(choose, "measure_candidate", running_clock)
    torch.manual_seed(0)
    cls = R.REGISTRY[name]
    f, ref = fused_pair(getattr(fused, cls.__name__), cls, 8, dtype=torch.float64, device="cpu",
                        **module_kwargs(name, 8))
    x = torch.randn(2, 8, 6, 5, dtype=torch.float64)
    g = torch.randn_like(x)
    got = training_step(f, x, g, "cpu")
    assert {"fused", "eager"} <= set(measured)
    assert_steps_match(got, training_step(ref, x, g), torch.float64, gradient_names(ref))
    assert f"{cls.__name__} training [cpu float64 (2, 8, 6, 5)" in choose.explain()
    assert f": {winner} (measured" in choose.explain()
    rounds = len(measured)
    training_step(f, x, g, "cpu")
    assert len(measured) == rounds  # the key is known: not measured again


def test_training_choice_measured_for_real_leaves_the_module_as_one_step_does(compiled_ops):
    """Bridge (BatchNorm1d running statistics, bridge maps) on the real clock: both candidates
    are timed, and the module's buffers and gradients after the measured step are those of
    one reference step."""
    from helpers import assert_steps_match, fused_pair, gradient_names, training_step

    from attnkernels import nn as fused
    from attnkernels import reference as R

    torch.manual_seed(0)
    f, ref = fused_pair(fused.Bridge, R.Bridge, 8, [4, 3], dtype=torch.float64, device="cpu")
    x = torch.randn(3, 8, 5, 4, dtype=torch.float64)
    g = torch.randn_like(x)
    assert_steps_match(training_step(f, x, g, "cpu"), training_step(ref, x, g), torch.float64, gradient_names(ref))
    lines = [line for line in choose.explain().splitlines() if "Bridge training [" in line]
    assert len(lines) == 1 and "measured: fused " in lines[0] and ", eager " in lines[0], choose.explain()


def test_a_module_holding_a_sync_batch_norm_is_not_measured(compiled_ops):
    """Its collectives would run as many times as each process's measurement takes rounds:
    the static rule (the fused attend), nothing measured or remembered."""
    from attnkernels import nn as fused
    from attnkernels.nn._fused import pick_training

    module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(fused.GAM(8, reduction=4)).train()
    x = torch.randn(2, 8, 5, 4, requires_grad=True)
    attends = {"fused": lambda *a: pytest.fail("measured"), "eager": lambda *a: pytest.fail("measured")}
    assert pick_training(module, x, (), attends) == "fused"
    assert "none made yet" in choose.explain()


@pytest.mark.parametrize("name", ["SE", "GAM", "Bridge"])
def test_measuring_inside_a_non_reentrant_checkpoint(name, compiled_ops):
    """A first training call inside torch.utils.checkpoint (use_reentrant=False, its default):
    the measurements' saved tensors stay out of the checkpoint's hooks, so its recomputation
    matches the forward, and the gradients are the reference module's. SE's choice is its op's,
    GAM's nests its convs' under its own, Bridge's is the module's alone."""
    from torch.utils.checkpoint import checkpoint

    from helpers import fused_pair, module_kwargs

    from attnkernels import nn as fused
    from attnkernels import reference as R

    torch.manual_seed(0)
    kwargs = module_kwargs(name.lower(), 8)
    f, ref = fused_pair(getattr(fused, name), getattr(R, name), 8, dtype=torch.float64, device="cpu", **kwargs)
    x = torch.randn(2, 8, 6, 5, dtype=torch.float64)
    g = torch.randn_like(x)
    grads = []
    for module, ckpt in ((f, True), (ref, False)):
        leaf = x.clone().requires_grad_()
        with backend.use_backend("cpu" if module is f else None):
            y = checkpoint(module, leaf, use_reentrant=False) if ckpt else module(leaf)
            y.backward(g)
        grads.append([leaf.grad] + [p.grad for p in module.parameters()])
    assert "measured" in choose.explain()
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("train", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("timm_name", ["SEModule", "EcaModule", "CbamModule"])
def test_a_module_fused_from_timm_is_measured_against_timms_forward(timm_name, train, monkeypatch, compiled_ops):
    """A fused module that `fuse` made from a timm module holds timm's submodules, whose
    forwards differ from the reference's (timm's CBAM channel gate returns x times the gate):
    its eager candidate is the timm module's own forward, so whichever wins, the output is
    timm's."""
    import copy

    import timm.layers
    from timm.layers.cbam import CbamModule

    import attnkernels

    def eager_wins(name, fn, args, prepared):
        choose.forward_backward(fn, args)()
        return 1e-3 if name == "eager" else 1.0

    monkeypatch.setattr(choose, "measure_candidate", eager_wins)
    torch.manual_seed(0)
    theirs = {"SEModule": timm.layers.SEModule, "EcaModule": timm.layers.EcaModule, "CbamModule": CbamModule}[timm_name]
    theirs = theirs(16).double().train(train)
    with torch.no_grad():
        for p in theirs.parameters():
            p.uniform_(-0.6, 0.6)
    ours = attnkernels.fuse(copy.deepcopy(theirs))
    assert type(ours).__module__.startswith("attnkernels.nn")
    x = torch.randn(2, 16, 6, 5, dtype=torch.float64)
    with backend.use_backend("cpu"), torch.set_grad_enabled(train):
        got = ours(x.clone().requires_grad_(train))
    want = theirs(x.clone().requires_grad_(train))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert ": eager (measured" in choose.explain() or not train and timm_name != "CbamModule"
