"""Sharing head annotations with other tools (:mod:`.exchange`): export an atlas score in their
formats, import their annotations as atlas columns. The formats themselves live in
:mod:`headatlas.apps.common.formats`."""
