//! Architecture-specific guest set-up: the data structures a guest finds in
//! memory and registers at its first instruction.
//!
//! Everything here is pure data built into guest memory or into KVM register
//! structs, so it is unit-tested by reading guest memory back; the ioctls
//! that hand it to KVM live in `vstate/`. Only x86-64 is supported: the
//! guest kernel is entered directly in 64-bit long mode.

pub mod x86_64;
