"""bench/tora.py's decision rules: each verdict from hand-made per-seed errors."""

from paperjax.bench import tora as bench_tora


def _errors(table: dict[str, list[tuple[float, float]]]) -> dict:
  """{fuser: [(error at 16 frames, error at 64 frames) per seed]} -> errors[(fuser, seed)][frames]."""
  return {(f, s): {16: short, 64: long} for f, rows in table.items() for s, (short, long) in enumerate(rows)}


def test_every_rule_can_hold_fail_or_stay_undecided():
  clear = _errors(
    {
      "none": [(9.0, 10.0), (8.0, 9.0)],
      "concat": [(3.0, 4.0), (8.5, 9.0)],  # gains 6 px with one seed, -0.5 with the other
      "cross_attention": [(8.5, 9.0), (7.5, 8.0)],  # gains under a pixel with both seeds
      "adanorm": [(1.0, 1.5), (1.0, 3.0)],  # grows 1.5x and 3x: one seed each way
    }
  )
  assert bench_tora.verdicts(clear, 16, 64) == {
    "guidance lowers the error (concat)": "undecided",
    "guidance lowers the error (cross_attention)": "fails",
    "guidance lowers the error (adanorm)": "holds",
    "adaptive norm is the best fuser": "holds",
    "error grows slowly with duration": "undecided",
  }
  beaten = _errors(
    {
      "none": [(9.0, 9.0), (9.0, 9.0)],
      "concat": [(0.5, 0.6), (0.9, 1.0)],  # below adanorm by more than TIE_PX for every seed
      "adanorm": [(1.0, 1.2), (1.05, 1.9)],
    }
  )
  verdicts = bench_tora.verdicts(beaten, 16, 64)
  assert verdicts["adaptive norm is the best fuser"] == "fails"
  assert verdicts["error grows slowly with duration"] == "holds"
  tied = _errors({"none": [(9.0, 9.0)], "concat": [(1.05, 1.0)], "adanorm": [(1.0, 3.0)]})
  verdicts = bench_tora.verdicts(tied, 16, 64)
  assert verdicts["adaptive norm is the best fuser"] == "undecided"  # within TIE_PX
  assert verdicts["error grows slowly with duration"] == "fails"
  # Scored only at the training length: growth is undecided, not a trivial "holds".
  assert bench_tora.verdicts(tied, 16, 16)["error grows slowly with duration"] == "undecided"
