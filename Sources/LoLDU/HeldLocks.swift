import Glibc

/// The descriptors that hold this process's `flock`s on checkpoint directories
/// (``AtomicFile/LockedDirectory``, ``AtomicDirectory``). A child of `fork()` inherits them,
/// and with them the locks, for as long as it lives: a fork during a save would lock the
/// directory against the parent's next saves. The child closes them (which leaves the parent's
/// locks as they are): the threads that used them do not exist there.
enum HeldLocks {
    nonisolated(unsafe) private static var descriptors: [Int32] = []
    nonisolated(unsafe) private static let mutex: UnsafeMutablePointer<pthread_mutex_t> = {
        let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
        pthread_mutex_init(mutex, nil)
        pthread_atfork({ pthread_mutex_lock(HeldLocks.mutex) }, { pthread_mutex_unlock(HeldLocks.mutex) }, {
            for fd in HeldLocks.descriptors { _ = Glibc.close(fd) }
            HeldLocks.descriptors.removeAll()
            pthread_mutex_unlock(HeldLocks.mutex)
        })
        return mutex
    }()

    /// `fd` holds a lock from now on.
    static func add(_ fd: Int32) {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        descriptors.append(fd)
    }

    /// Closes `fd`, a descriptor ``add(_:)`` was given.
    static func close(_ fd: Int32) {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        if let i = descriptors.firstIndex(of: fd) { descriptors.remove(at: i) }
        _ = Glibc.close(fd)
    }
}
