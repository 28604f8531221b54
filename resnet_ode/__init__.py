"""The reproduction's package: everything the scripts at the top level run on, one job per module.

A run goes: flags (the command line) -> gate (every rule, once; a read-only Config) -> launch
(claim the files, join the process group) -> mnist / cifar / synthetic (data and network) ->
training (the loop) -> saving (checkpoints, resume state, metrics, the results pickle).
docs/architecture.md follows one run through them.
"""
