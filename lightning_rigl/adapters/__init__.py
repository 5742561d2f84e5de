"""The Lightning adapters: RigLCallback and SparsityMonitor translate Lightning's hooks into the core's calls.

Everything here may import Lightning; nothing in :mod:`lightning_rigl.core` imports from here.
"""
