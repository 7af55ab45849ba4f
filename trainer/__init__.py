"""The prefloop trainer worker: reward models, SFT, PPO, DPO and RLOO on the labels.

Only this package imports torch; the web server (`app/`) never does.
"""
