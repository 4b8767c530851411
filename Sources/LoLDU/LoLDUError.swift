/// An error of the library, with the message a caller sees through `loldu_last_error()`.
///
/// Each case maps to one fixed C status code (`include/loldu.h`); the raw values are part of
/// the ABI and are never renumbered.
public struct LoLDUError: Error, CustomStringConvertible {
    public enum Code: Int32, Sendable {
        case invalidArgument = 1   // LOLDU_ERR_INVALID_ARGUMENT
        case nullPointer = 2       // LOLDU_ERR_NULL_POINTER
        case shape = 3             // LOLDU_ERR_SHAPE
        case notFinite = 4         // LOLDU_ERR_NOT_FINITE
        case dtype = 5             // LOLDU_ERR_DTYPE
        case state = 6             // LOLDU_ERR_STATE
        case outOfMemory = 7       // LOLDU_ERR_OUT_OF_MEMORY
        case invalidHandle = 8     // LOLDU_ERR_INVALID_HANDLE
        case io = 9                // LOLDU_ERR_IO
        case format = 10           // LOLDU_ERR_FORMAT
        case mismatch = 11         // LOLDU_ERR_MISMATCH
        case `internal` = 12       // LOLDU_ERR_INTERNAL
        case cancelled = 13        // LOLDU_ERR_CANCELLED
    }

    public let code: Code
    public let message: String

    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { message }

    public static func invalid(_ message: String) -> LoLDUError { .init(.invalidArgument, message) }
    public static func shape(_ message: String) -> LoLDUError { .init(.shape, message) }
    public static func state(_ message: String) -> LoLDUError { .init(.state, message) }
}

/// Runs `body` (a call through a standard-library `rethrows` function, which erases typed
/// throws) and gives its error back its type.
func rethrowing<R>(_ body: () throws -> R) throws(LoLDUError) -> R {
    do {
        return try body()
    } catch let error as LoLDUError {
        throw error
    } catch {
        throw LoLDUError(.internal, "unexpected error: \(error)")
    }
}
