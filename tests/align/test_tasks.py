import numpy as np

from paperjax.align import tasks


def test_score_counts_sorted_positions_before_eos():
  task = tasks.SortTask(length=4, num_digits=6)
  prompt = np.array([[tasks.BOS, 7, 4, 9, 5, tasks.SEP]])  # sorted: 4 5 7 9
  assert task.score(prompt, np.array([[4, 5, 7, 9, tasks.EOS]]))[0] == 4
  assert task.score(prompt, np.array([[4, 7, 7, 9, tasks.EOS]]))[0] == 3
  assert task.score(prompt, np.array([[4, tasks.EOS, 7, 9, tasks.EOS]]))[0] == 1  # nothing after EOS counts


def test_noise_and_pairs(np_rng):
  task = tasks.SortTask()
  prompts = task.prompts(np_rng, 500)
  assert (task.score(prompts, task.demonstrations(np_rng, prompts, 0.0)) == task.length).all()
  noisy = task.score(prompts, task.demonstrations(np_rng, prompts, 0.5)).mean()
  # Each position survives w.p. 0.5 and a random digit is right w.p. 1/10.
  assert abs(noisy / task.length - (0.5 + 0.5 / task.num_digits)) < 0.03
  p, c, r = task.preference_pairs(np_rng, 300)
  assert len(p) == len(c) == len(r) == 300
  assert (task.score(p, c) > task.score(p, r)).all()
