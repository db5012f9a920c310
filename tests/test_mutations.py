"""benchmarks/mutations.py: a mutation applies exactly once or stops, every listed mutation still
applies to the code, and the matrix says which rows the check catches (on hand-made results)."""

import pytest

from benchmarks import mutations as mu


def test_apply_replaces_one_occurrence_and_refuses_zero_or_two(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\ny = 2\ny = 2\n")
    mu.apply(mu.Mutation("m", "a.py", "x = 1", "x = -1", "sign", ("r",)), tmp_path)
    assert (tmp_path / "a.py").read_text() == "x = -1\ny = 2\ny = 2\n"
    for old in ("z = 3", "y = 2"):
        with pytest.raises(ValueError, match="must be once"):
            mu.apply(mu.Mutation("m", "a.py", old, "", "", ("r",)), tmp_path)


def test_every_listed_mutation_applies_to_the_current_code_and_names_smoke_rows():
    from benchmarks.suites import SUITES

    smoke = {r.id for r in SUITES["smoke"].runs}
    assert len({m.id for m in mu.MUTATIONS}) == len(mu.MUTATIONS)
    for m in mu.MUTATIONS:
        assert (mu.ROOT / m.file).read_text().count(m.old) == 1, m.id
        assert m.old != m.new and set(m.rows) <= smoke, m.id


def test_caught_rows_follow_the_check_and_the_matrix_counts_them():
    base = {"floor": 2.0, "k_std": 3.0, "runs": {
        "a": {"metric": "acc", "mean": 80.0, "std": 0.5, "values": [79.5, 80.5], "higher_is_better": True},
        "b": {"metric": "acc", "mean": 80.0, "std": 0.5, "values": [79.5, 80.5], "higher_is_better": True}}}
    fresh = {"a": {"mean": 70.0, "std": 0.0, "values": [70.0, 70.0]},  # 10 below: beyond max(3 * 0.5, 2)
             "b": {"mean": 79.0, "std": 0.0, "values": [79.0, 79.0]}}  # 1 below: within
    caught = mu.caught_rows(base, fresh, ("a", "b"), set(), {"a": "g", "b": "g"})
    assert caught["a"].startswith("a: acc (final.acc) 70 vs baseline 80: fell by 10 > tolerance 2")
    assert caught["b"] == ""
    res = [{"id": "m1", "what": "w", "caught": caught, "any_caught": True},
           {"id": "m2", "what": "w", "caught": {"b": ""}, "any_caught": False}]
    md = mu.matrix_md(res)
    assert "| `m1` | w | `a` | yes |" in md and "| `m2` | w | `b` | **no** |" in md
    assert "caught: 1 of 2 mutations" in md


def test_combine_merges_matrices_a_later_folder_replacing_an_earlier_result(tmp_path):
    import json

    ids = [m.id for m in mu.MUTATIONS[:2]]
    first = [{"id": i, "what": "w", "caught": {"r": ""}, "any_caught": False} for i in ids]
    again = [{"id": ids[1], "what": "w", "caught": {"r": "r: moved"}, "any_caught": True}]
    for name, res in (("a", first), ("b", again)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "matrix.json").write_text(json.dumps(res))
    assert mu.main(["--combine", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "out")]) == 0
    merged = json.loads((tmp_path / "out" / "matrix.json").read_text())
    assert [r["any_caught"] for r in merged] == [False, True]
    assert "caught: 1 of 2 mutations" in (tmp_path / "out" / "matrix.md").read_text()
