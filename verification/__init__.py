"""verification: tools for checking MX implementations against the mxref golden model."""
