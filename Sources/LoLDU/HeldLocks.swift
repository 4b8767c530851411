import Glibc

/// The descriptors that hold this process's `flock`s on checkpoint directories
/// (``AtomicFile/LockedDirectory``, ``AtomicDirectory``). A child of `fork()` inherits them,
/// and with them the locks, for as long as it lives: a fork during a save would lock the
/// directory against the parent's next saves. The child closes them (which leaves the parent's
/// locks as they are): the threads that used them do not exist there.
enum HeldLocks {
    nonisolated(unsafe) private static var descriptors: [Int32] = []
    private static let mutex: ProcessMutex = {
        pthread_atfork(nil, nil) {  // (the child: its only thread)
            for fd in HeldLocks.descriptors { _ = Glibc.close(fd) }
            HeldLocks.descriptors.removeAll()
        }
        return ProcessMutex()
    }()

    /// `fd` holds a lock from now on.
    static func add(_ fd: Int32) {
        mutex.withLock { descriptors.append(fd) }
    }

    /// Closes `fd`, a descriptor ``add(_:)`` was given.
    static func close(_ fd: Int32) {
        mutex.withLock {
            if let i = descriptors.firstIndex(of: fd) { descriptors.remove(at: i) }
            _ = Glibc.close(fd)
        }
    }
}
