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
