//! Room for the kernel I/O descriptors of the fast path (`iovec`s,
//! `mmsghdr`s), kept between calls so that no packet or batch allocates.
//!
//! The descriptors hold raw pointers, so a vector of them is neither `Send`
//! nor `Sync`, and the tasks that send (gotatun's sender, the TUN writer)
//! must be. [`Scratch`] is empty whenever it is not being used by a call:
//! [`Scratch::fill`] clears it first (a cancelled call may have left
//! entries) and [`Scratch::clear`] after, so only its capacity lives on.

/// A reusable vector of plain-data kernel descriptors.
pub(super) struct Scratch<T: Copy>(Vec<T>);

impl<T: Copy> std::fmt::Debug for Scratch<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Scratch(room for {})", self.0.capacity())
    }
}

impl<T: Copy> Default for Scratch<T> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

// SAFETY: the pointers inside the descriptors are only dereferenced by the
// kernel, during the system call made by the holder of `&mut Scratch` that
// filled them, while what they point to is borrowed; between calls the
// vector is cleared (or refilled before any use), so moving or sharing it
// between threads shares no live pointer.
unsafe impl<T: Copy> Send for Scratch<T> {}
// SAFETY: as for `Send`; `&Scratch` gives no access to the entries.
unsafe impl<T: Copy> Sync for Scratch<T> {}

impl<T: Copy> Scratch<T> {
    /// The vector, emptied, for filling.
    pub(super) fn fill(&mut self) -> &mut Vec<T> {
        self.0.clear();
        &mut self.0
    }

    /// The entries as the kernel takes them (pointer, count), for a call
    /// made without holding a reference across an `.await`.
    pub(super) fn raw(&self) -> (*const T, usize) {
        (self.0.as_ptr(), self.0.len())
    }

    /// Drops the entries (and the pointers in them), keeping the room.
    pub(super) fn clear(&mut self) {
        self.0.clear();
    }
}
