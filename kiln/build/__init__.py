"""Building engines for a placed graph: pre-build checks, the inputs a build is proven on,
backend candidate selection (isolated in child processes when measuring), verification
against eager, and the precision="auto" search over plans."""
