//! The training recipe: one optimisation step of encoder and decoder, and all the state it keeps.
