"""Apps that consume an atlas and call load/capture: importance, redundancy, pruning.

Nothing in the library imports this package except the command line.
"""
