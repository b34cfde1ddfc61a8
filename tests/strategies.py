"""Hypothesis strategies for the C integer types of the Xen ABI."""

from hypothesis import strategies as st

U8 = st.integers(0, 2**8 - 1)
U16 = st.integers(0, 2**16 - 1)
U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)
S16 = st.integers(-(2**15), 2**15 - 1)
