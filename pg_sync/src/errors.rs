//! User-facing errors: every one carries a SQLSTATE and a hint, and none echoes row values.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

/// Raises an ERROR with `code`, `message` and `hint`; aborts the current statement.
pub fn raise(code: PgSqlErrorCode, message: impl Into<String>, hint: impl Into<String>) -> ! {
    ErrorReport::new(code, message.into(), "pg_sync")
        .set_hint(hint.into())
        .report(PgLogLevel::ERROR);
    unreachable!("ERROR does not return")
}

/// Bad argument value (22023) with a hint.
pub fn invalid(message: impl Into<String>, hint: impl Into<String>) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        message,
        hint,
    )
}
