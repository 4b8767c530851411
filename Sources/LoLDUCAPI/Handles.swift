import Glibc
import LoLDU
import Synchronization

/// Live objects behind C handles. A handle is an opaque token (a counter value, never an
/// address and never reused), so a NULL, stale, double-freed or made-up handle is recognised
/// and answered with a status instead of being dereferenced.
final class HandleTable<Object: Sendable>: Sendable {
    private struct State {
        var objects: [UInt: Object] = [:]
        var next: UInt = 0x10
    }
    private let state = Mutex(State())
    let kind: String

    init(kind: String) { self.kind = kind }

    func insert(_ object: Object) -> OpaquePointer {
        let token = state.withLock { state in
            let token = state.next
            state.next += 0x10
            state.objects[token] = object
            return token
        }
        return OpaquePointer(bitPattern: token)!
    }

    func get(_ handle: OpaquePointer?, _ name: String) throws(LoLDUError) -> Object {
        guard let handle else {
            throw LoLDUError(.nullPointer, "\(name) is NULL; expected a live \(kind) handle")
        }
        let token = UInt(bitPattern: Int(bitPattern: UnsafeRawPointer(handle)))
        guard let object = state.withLock({ $0.objects[token] }) else {
            throw LoLDUError(.invalidHandle, "\(name) is not a live \(kind) handle (never created, or already freed)")
        }
        return object
    }

    /// Removes a handle; returns whether it was live.
    @discardableResult
    func remove(_ handle: OpaquePointer?) -> Bool {
        guard let handle else { return false }
        let token = UInt(bitPattern: Int(bitPattern: UnsafeRawPointer(handle)))
        return state.withLock { $0.objects.removeValue(forKey: token) } != nil
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
