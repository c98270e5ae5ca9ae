"""`dmx combine`: the assignment of several dMX searches' mean offsets, and its refusals.

The expected assignment is recomputed here from the searches' logs with the rule the
docs state (clamp to [0, 2], mean, strictly above 1 goes to MXFP8, then promote the
closest to the boundary while the simple average fits), not with dmx.search.assign.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from cli_helpers import fails
from dmx.cli import main
from dmx.outdir import read_manifest, read_search_log
from dmx.outdir.read import load
from dmx.search import search
from tiny_models import tiny_model_dir, tiny_root

pytestmark = pytest.mark.usefixtures("single_threaded")

SMALL = dict(seqlen=32, samples=12, batch_size=2, progress=False, export_target="none")
TARGET = 6.0


@pytest.fixture(scope="module")
def searches(tmp_path_factory, calib):
    """Three 4-step searches of one tiny Llama (seeds 0, 1, 2) and one of 5 steps."""
    src = tiny_model_dir(tiny_root(tmp_path_factory), "llama")
    root = tmp_path_factory.mktemp("combine")
    outs = {s: root / f"s{s}" for s in (0, 1, 2)}
    for seed, out in outs.items():
        search(src, TARGET, calib=[calib], steps=4, seed=seed, out=out, **SMALL)
    outs["steps5"] = root / "steps5"
    search(src, TARGET, calib=[calib], steps=5, seed=3, out=outs["steps5"], **SMALL)
    return src, outs


def _expected(outs, fill: bool, key: str = "offsets") -> tuple[dict, list]:
    """The documented rule, by hand: (formats, mean offsets in model order). ``key``: the
    search log's offsets averaged (``final_offsets``: the last step's, for --kl)."""
    logs = [read_search_log(o)[key] for o in outs]
    names = list(logs[0])
    mean = [sum(min(2.0, max(0.0, float(log[n]))) for log in logs) / len(logs) for n in names]
    bits = {n: (8 if m > 1.0 else 4) for n, m in zip(names, mean)}
    if fill:  # closest to the boundary first; every unit that still fits
        for m, n in sorted((1.0 - m, n) for n, m in zip(names, mean) if bits[n] == 4):
            trial = dict(bits, **{n: 8})
            if sum(trial.values()) / len(trial) <= TARGET + 1e-6:
                bits = trial
    return {n: ("fp8_e4m3" if b == 8 else "fp4_e2m1") for n, b in bits.items()}, mean


@pytest.mark.parametrize("fill", [True, False])
def test_combined_formats_follow_the_mean_offsets(searches, tmp_path, capsys, fill):
    src, outs = searches
    inputs = [outs[s] for s in (0, 1, 2)]
    out = tmp_path / "comb"
    flag = "--fill-budget" if fill else "--no-fill-budget"
    assert main(["combine", *map(str, inputs), "-o", str(out), flag]) == 0
    assert "seeds 0, 1, 2" in capsys.readouterr().out
    m = read_manifest(out)
    expected, mean = _expected(inputs, fill)
    assert {n: e["format"] for n, e in m["layers"].items()} == expected
    assert all(e["act_format"] == e["format"] for e in m["layers"].values())
    combined = m["search"]["combined"]
    assert combined["seeds"] == [0, 1, 2] and combined["fill"] is fill
    assert list(combined["offsets"].values()) == mean
    assert [i["manifest_sha256"] for i in combined["inputs"]] == \
        [read_manifest(o)["manifest_sha256"] for o in inputs]
    assert m["avg_bits"]["simple"] <= TARGET + 1e-6
    # its cost is the searches' and its own; the report names it
    assert m["wall_time_s"] >= sum(read_manifest(o)["wall_time_s"] for o in inputs)
    from dmx.eval.report import collect
    (row,) = collect([out])
    assert row["recipe"] == "default, 3 seeds combined" and row["raw_bits"] is not None
    if not fill:
        assert m["search"]["budget_repair"]["moves"] == [] or all(
            mv["step"] == "fit" for mv in m["search"]["budget_repair"]["moves"])


def test_combined_out_runs_as_its_formats(searches, tmp_path):
    """The OUT holds the source weights in the combined formats: its logits equal the
    source model's with those formats applied, bit for bit."""
    from dmx.data import load_model_and_tokenizer
    from dmx.nn.layers import apply_formats

    src, outs = searches
    out = tmp_path / "comb"
    assert main(["combine", str(outs[0]), str(outs[1]), "-o", str(out)]) == 0
    formats = {n: e["format"] for n, e in read_manifest(out)["layers"].items()}
    ref, _ = load_model_and_tokenizer(src)
    apply_formats(ref, formats, formats)
    got, _, _ = load(out)
    ids = torch.randint(0, 4096, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = ref(input_ids=ids).logits
        b = got(input_ids=ids).logits
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_default_fill_is_the_searches_own(searches, tmp_path):
    _, outs = searches
    out = tmp_path / "comb"
    assert main(["combine", str(outs[0]), str(outs[2]), "-o", str(out)]) == 0
    cfg = read_manifest(outs[0])["search"]["config"]
    assert read_manifest(out)["search"]["combined"]["fill"] is cfg["fill_budget"]


def test_refusals(searches, tmp_path, capsys):
    src, outs = searches
    a, b = str(outs[0]), str(outs[1])
    o = ["-o", str(tmp_path / "comb")]
    fails(capsys, ["combine", a, *o], "at least two", tmp_path)
    fails(capsys, ["combine", a, a, *o], "given twice", tmp_path)
    fails(capsys, ["combine", a, str(outs["steps5"]), *o], "search setting 'steps'", tmp_path)
    twin = tmp_path / "twin"
    shutil.copytree(outs[0], twin)
    fails(capsys, ["combine", a, str(twin), *o], "both have --seed 0", tmp_path)
    assert main(["baseline", "--model", str(src), "--method", "uniform", "--format",
                 "fp8_e4m3", "-o", str(tmp_path / "uni"), "--export-target", "none"]) == 0
    capsys.readouterr()
    fails(capsys, ["combine", a, str(tmp_path / "uni"), *o], "written by `dmx search`",
          tmp_path)
    tampered = tmp_path / "tampered"
    shutil.copytree(outs[1], tampered)
    log = tampered / "search_log.jsonl"
    lines = log.read_text().splitlines()
    final = json.loads(lines[-1])
    first = next(iter(final["offsets"]))
    final["offsets"][first] = 2.0 - float(final["offsets"][first])
    log.write_text("\n".join(lines[:-1] + [json.dumps(final)]) + "\n")
    fails(capsys, ["combine", a, str(tampered), *o], "search_log.jsonl", tmp_path)
    (tmp_path / "comb").mkdir()
    fails(capsys, ["combine", a, b, *o], "--force", tmp_path)


def test_rotated_searches_are_refused(tmp_path_factory, calib, tmp_path, capsys):
    src = tiny_model_dir(tiny_root(tmp_path_factory), "llama", hidden=64, intermediate=128)
    outs = []
    for seed in (0, 1):
        outs.append(tmp_path / f"rot{seed}")
        search(src, TARGET, calib=[calib], steps=2, seed=seed, out=outs[-1],
               rotate="hadamard", **SMALL)
    fails(capsys, ["combine", *map(str, outs), "-o", str(tmp_path / "comb")],
          "--rotate hadamard", tmp_path)


# ----------------------------------------------------------------------------- --kl
@pytest.fixture(scope="module")
def kl_outs(searches, tmp_path_factory, calib):
    """Two KL baselines of the searches' model (calibration seeds 0 and 1) and one with
    fused units."""
    src, _ = searches
    root = tmp_path_factory.mktemp("kl")
    outs = {}
    for name, extra in (("s0", ["--seed", "0"]), ("s1", ["--seed", "1"]),
                        ("tied", ["--seed", "0", "--tie-fused"])):
        outs[name] = root / name
        assert main(["baseline", "--model", str(src), "--method", "kl", "--target-bits",
                     str(TARGET), "--calib", str(calib), "--samples", "2", "--seqlen", "32",
                     "--export-target", "none", "-o", str(outs[name]), *extra]) == 0
    return outs


def _rank(values: list) -> list:
    """Percentile ranks by counting: (smaller + (equal - 1) / 2) / (n - 1)."""
    n = len(values)
    return [(sum(w < v for w in values) + (sum(w == v for w in values) - 1) / 2) / (n - 1)
            for v in values]


def test_kl_fusion_follows_the_documented_rule(searches, kl_outs, tmp_path, capsys):
    """--kl with several searches: by default ("auto") the mean of the two percentile ranks
    (the searches' mean offset, the KL OUTs' summed sensitivity), ordered by it (ties: the
    mean offset, then model order), then every unit promoted to MXFP8 in that order while
    the simple average fits; --kl-rule max: the better of the two ranks."""
    _, outs = searches
    inputs, kls = [outs[s] for s in (0, 1, 2)], [kl_outs["s0"], kl_outs["s1"]]
    out = tmp_path / "fused"
    assert main(["combine", *map(str, inputs), "--kl", *map(str, kls), "-o", str(out)]) == 0
    assert "fused with 2 KL baseline(s)" in capsys.readouterr().out
    _check_fusion(inputs, kls, out, rule="mean")
    by_max = tmp_path / "fused-max"
    assert main(["combine", *map(str, inputs), "--kl", *map(str, kls), "--kl-rule", "max",
                 "-o", str(by_max)]) == 0
    _check_fusion(inputs, kls, by_max, rule="max")
    from dmx.eval.report import collect
    (row,) = collect([out])
    assert row["recipe"] == "default, 3 seeds combined, fused with 2 KL"


def test_one_search_fused_with_one_kl_baseline(searches, kl_outs, tmp_path, capsys):
    """--kl needs one search only: a mean over one, fused by default ("auto") by the better
    of the two ranks; --kl-rule mean by their mean."""
    _, outs = searches
    out = tmp_path / "fused1"
    assert main(["combine", str(outs[1]), "--kl", str(kl_outs["s1"]), "-o", str(out)]) == 0
    assert "fused with 1 KL baseline(s)" in capsys.readouterr().out
    _check_fusion([outs[1]], [kl_outs["s1"]], out, rule="max")
    from dmx.eval.report import collect
    (row,) = collect([out])
    assert row["recipe"] == "default, one search, fused with 1 KL"
    # --kl-rule mean: the mean of the two ranks (auto's rule for several searches)
    mean_out = tmp_path / "fused1-mean"
    assert main(["combine", str(outs[1]), "--kl", str(kl_outs["s1"]), "--kl-rule", "mean",
                 "-o", str(mean_out)]) == 0
    _check_fusion([outs[1]], [kl_outs["s1"]], mean_out, rule="mean")


def _check_fusion(inputs, kls, out, rule: str):
    """OUT is the documented fusion with the KL OUTs of the offsets each search assigned
    from (under the default --average-last, the mean of its last steps, not its final
    offsets): ordered by the better of the two ranks, ties by the worse (``rule`` "mean":
    by their mean)."""
    logs = [read_search_log(o) for o in inputs]
    assert any(log["final_offsets"] != log["offsets"] for log in logs)  # the key matters
    _, mean = _expected(inputs, fill=True)
    names = list(read_search_log(inputs[0])["offsets"])
    sens = [sum(read_manifest(k)["baseline"]["sensitivity"][n] for k in kls) for n in names]
    ranks = list(zip(_rank(mean), _rank(sens)))
    if rule == "max":
        score, second = [max(r) for r in ranks], [min(r) for r in ranks]
    else:
        score, second = [(a + b) / 2 for a, b in ranks], [0.0] * len(ranks)
    order = sorted(range(len(names)), key=lambda i: (-score[i], -second[i], -mean[i], i))
    bits = {n: 4 for n in names}
    for i in order:
        trial = dict(bits, **{names[i]: 8})
        if sum(trial.values()) / len(trial) <= TARGET + 1e-6:
            bits = trial
    expected = {n: ("fp8_e4m3" if b == 8 else "fp4_e2m1") for n, b in bits.items()}
    m = read_manifest(out)
    assert {n: e["format"] for n, e in m["layers"].items()} == expected
    fused = m["search"]["combined"]["kl"]
    assert fused["rule_name"] == rule
    assert [i["manifest_sha256"] for i in fused["inputs"]] == \
        [read_manifest(k)["manifest_sha256"] for k in kls]
    assert [fused["scores"][n] for n in names] == pytest.approx(score, abs=1e-12)
    assert m["search"]["budget_repair"] is None
    assert [m["search"]["combined"]["offsets"][n] for n in names] == \
        pytest.approx(mean, abs=1e-12)


def test_kl_fusion_refusals(searches, kl_outs, tmp_path, capsys):
    src, outs = searches
    a, b = str(outs[0]), str(outs[1])
    o = ["-o", str(tmp_path / "fused")]
    k0 = str(kl_outs["s0"])
    fails(capsys, ["combine", a, b, "--kl", k0, k0, *o], "given twice", tmp_path)
    fails(capsys, ["combine", "--kl", k0, a, b, *o], "put the searches first", tmp_path)
    fails(capsys, ["combine", *o], "pass two or more OUTs", tmp_path)
    fails(capsys, ["combine", a, b, "--kl", a, *o], "written by `dmx baseline --method kl`",
          tmp_path)
    fails(capsys, ["combine", a, b, "--kl", str(kl_outs["tied"]), *o],
          "run it with --no-tie-fused", tmp_path)
    fails(capsys, ["combine", a, b, "--kl", k0, "--no-fill-budget", *o],
          "drop --no-fill-budget", tmp_path)
    assert main(["baseline", "--model", str(src), "--method", "kl", "--target-bits",
                 str(TARGET), "--samples", "2", "--seqlen", "32", "--export-target", "none",
                 "--include", "mlp", "-o", str(tmp_path / "kl-mlp")]) == 0
    capsys.readouterr()
    fails(capsys, ["combine", a, b, "--kl", str(tmp_path / "kl-mlp"), *o],
          "quantizes other layers", tmp_path)
    fails(capsys, ["combine", a, b, "--kl-rule", "mean", *o], "--kl-rule says how --kl fuses",
          tmp_path)


def test_inputs_are_never_replaced_or_written_into(searches, kl_outs, tmp_path, capsys):
    """`-o KL_OUT --force` replaced a --kl input with the combination, and -o inside an
    input OUT was written there (the same command with --force was then refused)."""
    _, outs = searches
    a, b, k0 = str(outs[0]), str(outs[1]), str(kl_outs["s0"])
    before = {p: sorted(x.name for x in p.iterdir()) for p in (outs[0], kl_outs["s0"])}
    fails(capsys, ["combine", a, b, "--kl", k0, "-o", k0, "--force"], "also an input",
          tmp_path)
    fails(capsys, ["combine", a, b, "-o", str(outs[0] / "comb")], "inside the input",
          outs[0])
    fails(capsys, ["combine", a, b, "--kl", k0, "-o", str(kl_outs["s0"] / "comb")],
          "inside the input", kl_outs["s0"])
    assert {p: sorted(x.name for x in p.iterdir()) for p in before} == before
    assert read_manifest(k0)["method"] == "kl"  # sealed and still the KL baseline


def test_refusals_name_the_command_that_wrote_the_out(searches, kl_outs, tmp_path, capsys):
    """They said "a `dmx kl` OUT" and "a `dmx dmx` OUT", commands that do not exist."""
    _, outs = searches
    a, b, k0 = str(outs[0]), str(outs[1]), str(kl_outs["s0"])
    o = ["-o", str(tmp_path / "comb")]
    fails(capsys, ["combine", a, k0, *o], "an OUT of `dmx baseline --method kl`", tmp_path)
    fails(capsys, ["combine", a, b, "--kl", a, *o], "an OUT of `dmx search`", tmp_path)


def test_percentile_ranks_share_ties_and_span_zero_to_one():
    from dmx.search.rank_fusion import fused_order, percentile_ranks

    assert percentile_ranks({"a": 3.0, "b": 1.0, "c": 2.0}) == {"a": 1.0, "b": 0.0, "c": 0.5}
    # three units at the ladder's bottom share ranks 0, 1/4, 2/4: 1/4 each
    got = percentile_ranks({"a": 0.0, "b": 0.0, "c": 0.0, "d": 1.5, "e": 0.7})
    assert got == {"a": 0.25, "b": 0.25, "c": 0.25, "d": 1.0, "e": 0.75}
    assert percentile_ranks({"only": 5.0}) == {"only": 0.5}
    # fused by the mean: c is second on both, a first on one and last on the other; equal
    # fused scores go by the mean offset
    order, score = fused_order({"a": 2.0, "b": 0.0, "c": 1.0}, {"a": 0.1, "b": 0.9, "c": 0.5},
                               rule="mean")
    assert score == {"a": 0.5, "b": 0.5, "c": 0.5} and order == ["a", "c", "b"]


def test_fused_order_kl_weight_moves_the_rank_between_the_two_rankings():
    from dmx.errors import DMXError
    from dmx.search.rank_fusion import fused_order

    mean, sens = {"a": 2.0, "b": 0.0, "c": 1.0}, {"a": 0.1, "b": 0.9, "c": 0.5}
    # all of the weight on one side: that side's order alone
    assert fused_order(mean, sens, kl_weight=0.0, rule="mean")[0] == ["a", "c", "b"]
    assert fused_order(mean, sens, kl_weight=1.0, rule="mean")[0] == ["b", "c", "a"]
    order, score = fused_order(mean, sens, kl_weight=0.25, rule="mean")
    assert score == {"a": 0.75, "b": 0.25, "c": 0.5} and order == ["a", "c", "b"]
    with pytest.raises(DMXError, match=r"KL weight must be in \[0, 1\]"):
        fused_order(mean, sens, kl_weight=1.5)


def test_fused_order_max_rule_takes_each_sides_top_before_the_compromises():
    """rule="max": a unit's score is the better of its two ranks, ties by the worse one.
    Each side's first pick comes before a unit both rank second; "mean" ranks it first."""
    from dmx.errors import DMXError
    from dmx.search.rank_fusion import fused_order

    # a: the search's top, KL's bottom; b: KL's top, the search's bottom; c: both second
    mean = {"a": 3.0, "b": 0.0, "c": 2.0, "d": 1.0}
    sens = {"a": 0.0, "b": 3.0, "c": 2.0, "d": 1.0}
    order, score = fused_order(mean, sens)   # the default rule
    assert score == {"a": 1.0, "b": 1.0, "c": 2 / 3, "d": 1 / 3}
    assert order == ["a", "b", "c", "d"]   # a before b: the search's mean offset breaks it
    assert fused_order(mean, sens, rule="mean")[0][0] == "c"   # the compromise first
    # equal better ranks: the worse rank decides
    order, _ = fused_order({"a": 3.0, "b": 1.0, "c": 2.0}, {"a": 0.0, "b": 1.0, "c": 3.0},
                           rule="max")
    assert order == ["c", "a", "b"]   # a and c both top somewhere; c's worse rank is 0.5
    with pytest.raises(DMXError, match="fusion rule 'median'"):
        fused_order(mean, sens, rule="median")


def test_auto_rule_is_max_for_one_search_and_mean_for_several():
    from dmx.errors import DMXError
    from dmx.search.rank_fusion import resolve_rule

    assert [resolve_rule(None, n) for n in (1, 2, 3)] == ["max", "mean", "mean"]
    assert [resolve_rule("auto", n) for n in (1, 9)] == ["max", "mean"]
    assert [resolve_rule(r, n) for r in ("max", "mean") for n in (1, 3)] == \
        ["max", "max", "mean", "mean"]
    with pytest.raises(DMXError, match="--kl-rule median: use one of auto, max, mean"):
        resolve_rule("median", 1)
