"""The training loop around the steps, shared by every entrance and strategy:

  controller  LoopController: the position and every decision in one order (agreed stop, checkpoints, metric
              averaging, exact evaluation, writers, elastic commit); a plain object any loop drives
  fit         FitHooks, the thin Keras callback that lets `fit` drive it; fit_segments (fit in whole epochs)
  agreement   the agreed stop (non-finite values, stop requests, a peer's data error)
  averages    metric averaging and batch-norm statistics averaged over replicas
  watchdog    ends a rank that makes no progress (a dead or stalled peer)
  stop        stop requests: signals and the run directory's STOP file
  display     rank 0's writers: progress, metrics.csv, TensorBoard
  progress    Progress (where the loop is) and Options (how it behaves)
"""
