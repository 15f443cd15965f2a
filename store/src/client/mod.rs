//! The store client: contributes memory to the store and moves object bytes with the TransferEngine.
