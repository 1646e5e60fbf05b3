"""ShapesWorld: the synthetic image + question world behind the shipped tiny target and drafter."""
