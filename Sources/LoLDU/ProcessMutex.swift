import Glibc

/// A pthread mutex (which ThreadSanitizer understands) over state the whole process shares: the
/// handle registry, the oneDNN primitive cache, the held checkpoint locks, the BLAS settings.
/// Made once per such state and never freed. Every one is held across `fork()`, as glibc holds
/// malloc's locks: the forking thread takes them all (in the order they were made) and releases
/// them in parent and child, so that a child forked while another thread held one does not find
/// it locked for ever. Code holding one never takes another, so that order cannot deadlock.
public final class ProcessMutex: @unchecked Sendable {
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>

    public init() {
        mutex = .allocate(capacity: 1)
        pthread_mutex_init(mutex, nil)
        pthread_mutex_lock(Self.listMutex)
        Self.all.append(mutex)
        pthread_mutex_unlock(Self.listMutex)
    }

    public func withLock<R, Failure: Error>(_ body: () throws(Failure) -> R) throws(Failure) -> R {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body()
    }

    /// Every mutex made, under ``listMutex``.
    nonisolated(unsafe) private static var all: [UnsafeMutablePointer<pthread_mutex_t>] = []
    /// Guards ``all``; held across fork() with them.
    nonisolated(unsafe) private static let listMutex: UnsafeMutablePointer<pthread_mutex_t> = {
        let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
        pthread_mutex_init(mutex, nil)
        pthread_atfork(ProcessMutex.lockAll, ProcessMutex.unlockAll, ProcessMutex.unlockAll)
        return mutex
    }()

    private static let lockAll: @convention(c) () -> Void = {
        pthread_mutex_lock(ProcessMutex.listMutex)
        for mutex in ProcessMutex.all { pthread_mutex_lock(mutex) }
    }

    private static let unlockAll: @convention(c) () -> Void = {
        for mutex in ProcessMutex.all.reversed() { pthread_mutex_unlock(mutex) }
        pthread_mutex_unlock(ProcessMutex.listMutex)
    }
}
