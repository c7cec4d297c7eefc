"""Step math and the policy: noise schedules (VP and flow), the DDPM/DDIM step as a Gaussian policy with exact
log-probs and KLs, continuous-time SDE solvers, consistency-model schedules, clean-sample (x0) estimators and the
exact Gaussian-mixture math behind the known-optimum tasks. Imports nothing from the layers above."""
