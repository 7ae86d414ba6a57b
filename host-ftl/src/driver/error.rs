//! The driver's error type: for managing guests and opening the driver. A guest's commands never
//! get these; they get an NVMe status in their completion.

use state_store::StoreError;

/// Everything that can go wrong managing the driver and its guests.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The state store failed.
    #[error("state store: {context}")]
    Store {
        context: String,
        #[source]
        source: StoreError,
    },

    /// The device refused a geometry or an address.
    #[error("device")]
    Device(#[from] crate::Error),

    /// A guest name is empty, too long, or has characters other than letters, digits, `.`, `_`
    /// and `-`.
    #[error("guest name {0:?} is not valid: use 1 to 64 letters, digits, '.', '_' or '-'")]
    BadName(String),

    #[error("guest {0:?} already exists")]
    GuestExists(String),

    #[error("no guest {0:?}")]
    NoSuchGuest(String),

    /// The guest was removed and its PUs are still being reclaimed.
    #[error("guest {0:?} is being reclaimed")]
    Reclaiming(String),

    #[error("not enough free parallel units: {wanted} wanted, {free} free of {total}")]
    NotEnoughPus { wanted: usize, free: usize, total: usize },

    /// A guest's spec (PU count, weight, limits, region size) makes no sense.
    #[error("invalid guest spec: {0}")]
    BadSpec(String),

    /// A record of the partition table cannot be read or does not fit the device.
    #[error("partition table record {key}: {reason}")]
    BadRecord { key: String, reason: String },

    /// The partition table was made for a device of another shape.
    #[error("the partition table belongs to another device: {0}")]
    DeviceMismatch(String),

    /// Only a driver on a simulated clock is advanced by hand.
    #[error("the driver runs on the real clock; only a simulated clock is advanced by hand")]
    NotSimulated,

    /// The dispatcher thread could not be started.
    #[error("cannot start the dispatcher thread")]
    Thread(#[source] std::io::Error),

    /// The driver's configuration makes no sense.
    #[error("invalid driver configuration: {0}")]
    BadConfig(String),
}

/// The driver's result type.
pub type Result<T, E = DriverError> = std::result::Result<T, E>;
