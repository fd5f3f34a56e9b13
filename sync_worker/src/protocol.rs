//! Protocol v1 constants shared by the API and the hub (see docs/protocol.md).

/// Close codes (4000-4999 are ours).
pub mod close {
    pub const HEARTBEAT: u16 = 4000;
    pub const BAD_INPUT: u16 = 4400;
    pub const CURSOR_AHEAD: u16 = 4409;
    pub const SLOW_CONSUMER: u16 = 4008;
    pub const INTERNAL: u16 = 1011;
    pub const GOING_AWAY: u16 = 1001;
    pub const TOO_BIG: u16 = 1009;
    pub const REVOKED: u16 = 4401;
    /// The session's JWT expired (`exp` passed): reconnect with a fresh token.
    pub const TOKEN_EXPIRED: u16 = 4402;
    pub const RESYNC: u16 = 4410;
}

/// Every error code the API answers with, over HTTP (a JSON body), WebSocket and SSE (an
/// `error` frame): its protocol word, the HTTP status it is refused with, and the WebSocket
/// close code that follows its frame when it ends the session. One list, so a code means the
/// same on every transport and a new one is added in one place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    MissingToken,
    InvalidToken,
    TokenExpired,
    InvalidApiKey,
    Unavailable,
    BadCursor,
    BadLimit,
    CursorAhead,
    SlotInvalid,
    NotStreaming,
    BadRequest,
    TooLarge,
    ResyncRequired,
    UnknownModel,
    Busy,
    NotFound,
    MethodNotAllowed,
    /// A WebSocket message that is not protocol v1.
    BadMessage,
    AlreadySubscribed,
    /// The server ended an SSE stream (a slow consumer, a revoked key): the message says why.
    Closed,
    /// A bootstrap stopped for a shutdown; its frame carries the cursor to resume from.
    ShuttingDown,
    /// A bootstrap ran for its time limit; its frame carries the cursor to resume from.
    Deadline,
    /// What an unknown code is reported as.
    Internal,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 23] = [
        ErrorCode::MissingToken,
        ErrorCode::InvalidToken,
        ErrorCode::TokenExpired,
        ErrorCode::InvalidApiKey,
        ErrorCode::Unavailable,
        ErrorCode::BadCursor,
        ErrorCode::BadLimit,
        ErrorCode::CursorAhead,
        ErrorCode::SlotInvalid,
        ErrorCode::NotStreaming,
        ErrorCode::BadRequest,
        ErrorCode::TooLarge,
        ErrorCode::ResyncRequired,
        ErrorCode::UnknownModel,
        ErrorCode::Busy,
        ErrorCode::NotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::BadMessage,
        ErrorCode::AlreadySubscribed,
        ErrorCode::Closed,
        ErrorCode::ShuttingDown,
        ErrorCode::Deadline,
        ErrorCode::Internal,
    ];

    /// The protocol word (`"code"` of a body or frame).
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::MissingToken => "missing_token",
            ErrorCode::InvalidToken => "invalid_token",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::InvalidApiKey => "invalid_api_key",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::BadCursor => "bad_cursor",
            ErrorCode::BadLimit => "bad_limit",
            ErrorCode::CursorAhead => "cursor_ahead",
            ErrorCode::SlotInvalid => "slot_invalid",
            ErrorCode::NotStreaming => "not_streaming",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::ResyncRequired => "resync_required",
            ErrorCode::UnknownModel => "unknown_model",
            ErrorCode::Busy => "busy",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::BadMessage => "bad_message",
            ErrorCode::AlreadySubscribed => "already_subscribed",
            ErrorCode::Closed => "closed",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Deadline => "deadline",
            ErrorCode::Internal => "internal",
        }
    }

    /// The code with this protocol word; `Internal` for any other.
    pub fn parse(word: &str) -> ErrorCode {
        ErrorCode::ALL
            .into_iter()
            .find(|c| c.as_str() == word)
            .unwrap_or(ErrorCode::Internal)
    }

    /// The HTTP status a request refused with this code gets.
    pub fn status(self) -> axum::http::StatusCode {
        use axum::http::StatusCode as S;
        match self {
            ErrorCode::MissingToken
            | ErrorCode::InvalidToken
            | ErrorCode::TokenExpired
            | ErrorCode::InvalidApiKey => S::UNAUTHORIZED,
            ErrorCode::Unavailable
            | ErrorCode::SlotInvalid
            | ErrorCode::NotStreaming
            | ErrorCode::Busy
            | ErrorCode::ShuttingDown => S::SERVICE_UNAVAILABLE,
            ErrorCode::BadCursor
            | ErrorCode::BadLimit
            | ErrorCode::BadRequest
            | ErrorCode::UnknownModel
            | ErrorCode::BadMessage
            | ErrorCode::AlreadySubscribed => S::BAD_REQUEST,
            ErrorCode::CursorAhead => S::CONFLICT,
            ErrorCode::ResyncRequired => S::GONE,
            ErrorCode::TooLarge => S::PAYLOAD_TOO_LARGE,
            ErrorCode::NotFound => S::NOT_FOUND,
            ErrorCode::MethodNotAllowed => S::METHOD_NOT_ALLOWED,
            ErrorCode::Closed | ErrorCode::Deadline | ErrorCode::Internal => {
                S::INTERNAL_SERVER_ERROR
            }
        }
    }

    /// The WebSocket close code that follows this code's `error` frame when the session ends
    /// with it (`None`: the session goes on, or is not ended by this code alone).
    pub const fn close(self) -> Option<u16> {
        match self {
            ErrorCode::ResyncRequired => Some(close::RESYNC),
            ErrorCode::CursorAhead => Some(close::CURSOR_AHEAD),
            ErrorCode::Unavailable | ErrorCode::Internal => Some(close::INTERNAL),
            ErrorCode::TokenExpired => Some(close::TOKEN_EXPIRED),
            ErrorCode::InvalidApiKey => Some(close::REVOKED),
            ErrorCode::ShuttingDown => Some(close::GOING_AWAY),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ErrorCode;

    #[test]
    fn error_words_are_unique_and_parse_back() {
        for c in ErrorCode::ALL {
            assert_eq!(ErrorCode::parse(c.as_str()), c);
        }
        assert_eq!(ErrorCode::parse("no such code"), ErrorCode::Internal);
    }
}
