"""``release_pretrained`` (``--release-pretrained``): the train state takes over the loaded
model's params, so one copy of them is resident instead of two.

It must not change the run (the same params, step by step, and the same resumed run), must
free the model's arrays (counted from ``jax.live_arrays``, not from the option), and must
refuse what would read the released params: a staged plan, or training the released model
again.
"""

from __future__ import annotations

import gc
import json
import weakref

import jax
import numpy as np
import pytest
from _tiny import fit, make_tiny_bert, small_vader, write_vader_csv

import jaxtl
from jaxtl import cli, lora, lr_find, parallel
from jaxtl.encoding import encode_splits
from jaxtl.train.builder import StateBuilder
from jaxtl.transfer.trees import flatten, tree_bytes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_bert(str(tmp_path_factory.mktemp("release") / "bert"), dropout=0.1)
    model = jaxtl.load(path, num_labels=2)
    arrays, _ = encode_splits(model, small_vader(n_train=48, n_val=8, n_test=8))
    return path, arrays


def _config(release: bool, **overrides):
    return jaxtl.TrainConfig(
        batch_size=8, max_steps=4, release_pretrained=release, progress=False, **overrides
    )


def _live_bytes() -> int:
    gc.collect()
    return sum(x.nbytes for x in jax.live_arrays())


@pytest.mark.parametrize(
    "release, scale",
    [(False, {}), (True, {}), (True, {"remat": "full"}), (True, {"precision": "bf16"})],
)
def test_the_state_holds_the_only_copy_of_the_params(tiny, release, scale):
    """Also when the Trainer trains a rebuilt model (remat, bf16 compute) over the same arrays:
    the caller's model gives them up too."""
    path, _ = tiny
    model = jaxtl.load(path, num_labels=2)
    params_bytes = tree_bytes(model.params)
    config = _config(release, **scale)
    trainer = jaxtl.Trainer(model, jaxtl.make_plan("full", model.structure), config)
    assert (trainer.model is model) is not scale
    before = _live_bytes()
    state = trainer.init_state(total_steps=4)
    grown = _live_bytes() - before
    # Without the option the model keeps its arrays beside the state's; with it, they go.
    assert grown == tree_bytes(state) - (params_bytes if release else 0)
    assert model.released is release
    if release:
        shapes = flatten(model.params)
        assert all(isinstance(v, jax.ShapeDtypeStruct) for v in shapes.values())
        assert {p: (v.shape, v.dtype) for p, v in shapes.items()} == {
            p: (v.shape, v.dtype) for p, v in flatten(state.params).items()
        }


def test_a_released_run_trains_and_resumes_as_the_kept_one(tiny, tmp_path):
    path, arrays = tiny

    def run(release):
        model = jaxtl.load(path, num_labels=2)
        trainer = jaxtl.Trainer(model, jaxtl.make_plan("full", model.structure), _config(release))
        return fit(trainer, arrays["train"], arrays["validation"])

    kept = flatten(jax.device_get(run(False).state.params))
    released = flatten(jax.device_get(run(True).state.params))
    assert kept.keys() == released.keys()
    for p in kept:
        np.testing.assert_array_equal(released[p], kept[p], err_msg=p)

    # Preempted after step 2, then resumed from its checkpoint by a fresh process's objects.
    def resumed_run(**fit_kwargs):
        model = jaxtl.load(path, num_labels=2)
        trainer = jaxtl.Trainer(
            model, jaxtl.make_plan("full", model.structure), _config(True), str(tmp_path)
        )
        return fit(trainer, arrays["train"], arrays["validation"], **fit_kwargs)

    resumed_run(stop_at=2)
    resumed = flatten(jax.device_get(resumed_run(resume=True).state.params))
    for p in kept:
        np.testing.assert_array_equal(resumed[p], kept[p], err_msg=p)


def test_a_staged_plan_is_refused_before_compiling(tiny):
    path, _ = tiny
    model = jaxtl.load(path, num_labels=2)
    plan = jaxtl.make_plan("lp_ft(1)", model.structure)
    with pytest.raises(ValueError, match=r"release_pretrained \(--release-pretrained\).*lp_ft"):
        jaxtl.Trainer(model, plan, _config(True))
    assert not model.released


def test_a_released_model_is_refused_for_another_run(tiny):
    path, arrays = tiny
    model = jaxtl.load(path, num_labels=2)
    trainer = jaxtl.Trainer(model, jaxtl.make_plan("full", model.structure), _config(True))
    trainer.init_state(total_steps=4)
    with pytest.raises(ValueError, match="Trainer.init_state needs the model's own params"):
        trainer.init_state(total_steps=4)
    # They take no params to use instead: the advice is to load the model again, nothing else.
    reload = r"\(release_pretrained, --release-pretrained\): load the model again \(jaxtl.load"
    with pytest.raises(ValueError, match="jaxtl.finetune needs the model's own params.*" + reload):
        jaxtl.finetune(model, "full", small_vader(8, 8, 8), _config(False), verbose=False)
    with pytest.raises(ValueError, match="lr_find needs the model's own params.*" + reload):
        lr_find.lr_find(model, "full", small_vader(8, 8, 8))


def test_a_lora_run_frees_its_base_and_exports_from_the_result(tiny, tmp_path):
    path, _ = tiny
    data = small_vader(n_train=48, n_val=8, n_test=8)
    kept = jaxtl.finetune(jaxtl.load(path, num_labels=2), "lora(4)", data, _config(False),
                          verbose=False)  # fmt: skip
    model = jaxtl.load(path, num_labels=2)
    originals = [weakref.ref(x) for x in jax.tree.leaves(model.params)]
    result = jaxtl.finetune(model, "lora(4)", data, _config(True), verbose=False)
    gc.collect()
    # The adapted model and its base (the caller's model) gave up the same arrays.
    assert model.released and result.model.released
    assert all(r() is None for r in originals)
    released, ref = flatten(jax.device_get(result.params)), flatten(jax.device_get(kept.params))
    for p in ref:
        np.testing.assert_array_equal(released[p], ref[p], err_msg=p)
    # What needs the params takes the run's; asked for the model's own, it says what to do.
    out = jaxtl.export(result.model, tmp_path / "merged", result.params)
    merged = flatten(jaxtl.load(out, num_labels=2).params)
    assert merged.keys() == flatten(lora.base_model(kept.model).params).keys()
    lora.export_adapters(result.model, tmp_path / "adapters", result.params)
    for use in (
        lambda: jaxtl.export(result.model, tmp_path / "again"),
        lambda: lora.merge(result.model),
        lambda: lora.export_adapters(result.model, tmp_path / "adapters-again"),
    ):
        with pytest.raises(
            ValueError, match=r"pass the params to use \(params=, e.g. result.params\)"
        ):
            use()


def _recorded_release(out, arm: str) -> bool:
    with open(out / arm / "results.json") as f:
        assert json.load(f)["steps"] == 2
    with open(out / arm / "run.json") as f:
        return json.load(f)["config"]["release_pretrained"]


@pytest.mark.slow
def test_cli_reloads_the_model_for_each_pretrained_arm(tiny, tmp_path, capsys):
    """jaxtl finetune releases by default (the process has no other use for the loaded params),
    except for a staged recipe, which reads them in its later stages."""
    path, _ = tiny
    data = write_vader_csv(tmp_path / "words.csv", 64)
    out = tmp_path / "run"
    argv = ["finetune", "--model", path, "--data", data, "--text-column", "word"]
    argv += ["--label-column", "sentiment", "--recipe", "full,linear_probe", "--no-scratch"]
    argv += ["--max-steps", "2", "--batch-size", "8", "--out", str(out)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert [_recorded_release(out, a) for a in ("pretrained-full", "pretrained-linear_probe")] == [
        True,
        True,
    ]

    # A staged recipe keeps the loaded params by default, and asked to release them, refuses.
    argv[argv.index("full,linear_probe")] = "lp_ft(1)"
    assert cli.main(argv[:-1] + [str(tmp_path / "staged")]) == 0, capsys.readouterr().err
    assert _recorded_release(tmp_path / "staged", "pretrained-lp_ft1") is False
    assert cli.main([*argv[:-2], "--release-pretrained", "--out", str(tmp_path / "refused")]) == 2
    assert "--release-pretrained" in capsys.readouterr().err

    # A sequential sweep's cells of one seed load the model again, one per cell.
    sweep = ["sweep", "--model", path, "--data", data, "--text-column", "word", "--label-column"]
    sweep += ["sentiment", "--recipe", "last_n(1)", "--lr", "1e-3,1e-2", "--weight-decay", "0"]
    sweep += ["--max-steps", "2", "--batch-size", "8"]
    assert cli.main([*sweep, "--out", str(tmp_path / "sweep")]) == 0, capsys.readouterr().err
    with open(tmp_path / "sweep" / "sweep.json") as f:
        cells = json.load(f)["cells"]
    assert [(c["learning_rate"], c["steps"], c["error"]) for c in cells] == [
        (1e-3, 2, None),
        (1e-2, 2, None),
    ]


def test_the_cli_default_releases_unless_a_recipe_is_staged(tmp_path):
    from jaxtl.cli.options import train_config
    from jaxtl.cli.parser import build_parser

    def released(*argv):
        config = train_config(build_parser().parse_args(list(argv)), epochs=1)
        return config.scale.release_pretrained

    assert released("finetune") is True  # full and linear_probe
    assert released("finetune", "--recipe", "llrd(0.9),lora(8)") is True
    assert released("finetune", "--recipe", "full,gradual(every=1)") is False
    assert released("finetune", "--recipe", "lp_ft(1)") is False
    assert released("finetune", "--no-release-pretrained") is False
    # Asked for with a staged recipe anywhere in the list: refused before any arm runs.
    with pytest.raises(ValueError, match=r"--release-pretrained.*lp_ft\(1\)'s later stages"):
        released("finetune", "--recipe", "full,lp_ft(1)", "--release-pretrained")
    rules = tmp_path / "groups.toml"
    rules.write_text('[[group]]\nname = "head"\nmatch = ["classifier(/.*)?"]\n')
    assert released("finetune", "--rules", str(rules)) is True
    assert released("sweep", "--recipe", "last_n(1)") is True
    assert released("sweep", "--recipe", "last_n(1)", "--no-release-pretrained") is False
    # The verbs that reuse the loaded model after training never release it.
    assert released("lr-find") is False
    assert released("adapt", "--target-shift", "typos") is False


@pytest.mark.parametrize("command", ["lr-find", "adapt"])
def test_commands_that_reuse_the_model_have_no_release_flag(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--release-pretrained"])
    assert e.value.code == 2
    assert "unrecognized arguments: --release-pretrained" in capsys.readouterr().err


@pytest.mark.parametrize("release", [False, True])
def test_the_state_takes_over_its_copy_of_the_params_without_another(tiny, release, monkeypatch):
    """init_state places one copy of the params (the model keeps its own, or gives it up with
    release_pretrained), and the state's params are that copy's buffers, donated to the
    state's construction, not a further copy made while both are resident."""
    path, _ = tiny
    model = jaxtl.load(path, num_labels=2)
    trainer = jaxtl.Trainer(model, jaxtl.make_plan("full", model.structure), _config(release))
    names = set(flatten(model.params))
    placed = []
    copy_to = parallel.copy_to

    def spy(x, *args, **kwargs):
        out = copy_to(x, *args, **kwargs)
        if isinstance(x, dict) and set(flatten(x)) == names:
            placed.append({k: v.unsafe_buffer_pointer() for k, v in flatten(out).items()})
        return out

    monkeypatch.setattr(parallel, "copy_to", spy)
    originals = {k: v.unsafe_buffer_pointer() for k, v in flatten(model.params).items()}
    state = trainer.init_state(total_steps=4)
    (copy,) = placed
    held = {k: v.unsafe_buffer_pointer() for k, v in flatten(state.params).items()}
    assert held == copy
    assert not set(held.values()) & set(originals.values())  # a copy: the model's stay intact


@pytest.mark.parametrize("release", [False, True])
def test_finetune_trains_with_one_copy_of_the_params_resident(tiny, release, monkeypatch):
    """Through ``jaxtl.finetune`` (what ``jaxtl finetune`` runs), not the Trainer alone: once the
    state is built, the arrays of the params' largest leaf alive in the process are the state's
    own (params and AdamW's two moments) and, without release_pretrained, the model's. A local
    of ``finetune`` once kept the loaded params alive through the whole run."""
    path, _ = tiny
    gc.collect()
    before = jax.live_arrays()  # arrays of earlier tests of this process do not count
    model = jaxtl.load(path, num_labels=2)
    name, leaf = max(flatten(model.params).items(), key=lambda kv: kv[1].size)
    shape, dtype = leaf.shape, leaf.dtype
    earlier = sum(1 for x in before if x.shape == shape and x.dtype == dtype)
    del before
    counted = []
    init_state = StateBuilder.init_state

    def spy(self, *args, **kwargs):
        state = init_state(self, *args, **kwargs)
        gc.collect()
        live = [x for x in jax.live_arrays() if x.shape == shape and x.dtype == dtype]
        own = [x for x in jax.tree.leaves(state) if x.shape == shape]
        counted.append((len(live) - earlier, len(own)))
        return state

    monkeypatch.setattr(StateBuilder, "init_state", spy)
    del leaf  # the test's own reference
    jaxtl.finetune(model, "full", small_vader(n_train=48, n_val=8, n_test=8), _config(release))
    ((live, own),) = counted
    assert own == 3, name  # the params, and the moments' mu and nu
    assert live == own + (0 if release else 1)
