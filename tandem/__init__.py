"""tandem: Tandem RLVR."""
