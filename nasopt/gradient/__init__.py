"""Gradient-based search (DARTS, GDAS): the continuous relaxation of a trained supernet, the search
on it, and its run inside a nasopt study."""
