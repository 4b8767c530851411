import Glibc
import LoLDU

/// Every live object behind a C handle, of every kind, in one table. A handle is an opaque
/// token (a counter value shared by all kinds, never an address and never reused), so a NULL,
/// stale, double-freed or made-up handle, and a handle of another kind passed in its place
/// (`loldu_adapter_free((loldu_adapter *)optimizer)`), are recognised and answered with a status
/// instead of being dereferenced.
private let registry = Registry()

/// The table behind every handle, under one pthread mutex (which ThreadSanitizer understands).
/// An entry is its kind (the table's name: a static string, compared by address, copied
/// without reference counting) and the object in its table's box.
private final class Registry: @unchecked Sendable {
    struct Entry {
        let kind: StaticString
        let box: AnyObject
    }
    struct Entries {
        var objects: [UInt: Entry] = [:]
        var next: UInt = 0x10
    }
    private var entries = Entries()
    private let mutex: UnsafeMutablePointer<pthread_mutex_t> = {
        let m = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
        pthread_mutex_init(m, nil)
        return m
    }()

    func withLock<R>(_ body: (inout Entries) -> R) -> R {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return body(&entries)
    }
}

/// The handles of one kind: a typed view of the shared registry.
final class HandleTable<Object: Sendable>: Sendable {
    private final class Box: Sendable {
        let object: Object
        init(_ object: Object) { self.object = object }
    }
    let kind: StaticString

    init(kind: StaticString) { self.kind = kind }

    private static func token(_ handle: OpaquePointer) -> UInt {
        UInt(bitPattern: Int(bitPattern: UnsafeRawPointer(handle)))
    }

    private func isMine(_ entry: Registry.Entry) -> Bool { entry.kind.utf8Start == kind.utf8Start }

    func insert(_ object: Object) -> OpaquePointer {
        let entry = Registry.Entry(kind: kind, box: Box(object))
        let token = registry.withLock { registry in
            let token = registry.next
            registry.next += 0x10
            registry.objects[token] = entry
            return token
        }
        return OpaquePointer(bitPattern: token)!
    }

    /// The object of a live handle of this kind. `name` (the argument, for the message) is built
    /// only on failure: a grouped call looks up every adapter its rows use.
    func get(_ handle: OpaquePointer?, _ name: @autoclosure () -> String) throws(LoLDUError) -> Object {
        guard let handle else {
            throw LoLDUError(.nullPointer, "\(name()) is NULL; expected a live \(kind) handle")
        }
        guard let entry = registry.withLock({ $0.objects[Self.token(handle)] }) else {
            throw LoLDUError(.invalidHandle, "\(name()) is not a live \(kind) handle (never created, or already freed)")
        }
        guard isMine(entry) else {
            throw LoLDUError(.invalidHandle, "\(name()) is a \(entry.kind) handle, not a \(kind) handle")
        }
        return unsafeDowncast(entry.box, to: Box.self).object
    }

    /// Removes a handle of this kind; returns whether it was one (any other value: no-op).
    @discardableResult
    func remove(_ handle: OpaquePointer?) -> Bool {
        guard let handle else { return false }
        let token = Self.token(handle)
        let removed: Registry.Entry? = registry.withLock { registry in
            guard let entry = registry.objects[token], isMine(entry) else { return nil }
            return registry.objects.removeValue(forKey: token)
        }
        return removed != nil  // the object is released here, outside the lock
    }
}

let adapters = HandleTable<any AnyAdapter>(kind: "loldu_adapter")

// MARK: Thread-local last error

private let lastErrorKey: pthread_key_t = {
    var key = pthread_key_t()
    pthread_key_create(&key) { free($0) }
    return key
}()

func setLastError(_ message: String) {
    let previous = pthread_getspecific(lastErrorKey)
    pthread_setspecific(lastErrorKey, strdup(message))
    free(previous)
}

func lastErrorMessage() -> UnsafePointer<CChar> {
    if let message = pthread_getspecific(lastErrorKey) {
        return UnsafePointer(message.assumingMemoryBound(to: CChar.self))
    }
    return cString("")
}

/// A C string with static storage.
func cString(_ s: StaticString) -> UnsafePointer<CChar> {
    UnsafeRawPointer(s.utf8Start).assumingMemoryBound(to: CChar.self)
}

/// Runs a thunk body: `LOLDU_OK`, or the error's status with its message recorded.
@inline(__always)
func status(_ body: () throws(LoLDUError) -> Void) -> Int32 {
    do {
        try body()
        return 0
    } catch {
        setLastError(error.message)
        return error.code.rawValue
    }
}
