//! Keeping a valid token: the first login, single-flight re-authentication after a 403 or a
//! credential change, renewal before the TTL runs out, and lookups of tokens read from a file.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use reqwest::{Method, header::HeaderValue};
use serde::Deserialize;
use tokio::time::Instant;

use super::{MAINTENANCE_DEADLINE, Token, VaultClient, route::AuthInfo};
use crate::{
    config::VaultAuth,
    metrics::OutcomeLabels,
    transit::{auth, error::ClientError},
};

impl VaultClient {
    /// The current token and its generation, logging in first if there is none.
    pub(super) async fn token(&self, deadline: Instant) -> Result<(HeaderValue, u64), ClientError> {
        if let Some(token) = &**self.token.load() {
            return Ok((token.header.clone(), token.generation));
        }
        self.reauthenticate(None, deadline).await?;
        match &**self.token.load() {
            Some(token) => Ok((token.header.clone(), token.generation)),
            None => Err(ClientError::NoToken { method: self.settings.auth.name() }),
        }
    }

    /// Gets a new token, unless another task replaced the token the caller saw (`seen`, or `None`
    /// when it saw none) while this one waited: one login serves every waiting caller.
    pub(super) async fn reauthenticate(
        &self,
        seen: Option<u64>,
        deadline: Instant,
    ) -> Result<(), ClientError> {
        let _single_flight =
            tokio::time::timeout_at(deadline, self.login.lock()).await.map_err(|_| ClientError::Deadline)?;
        let current = (**self.token.load()).as_ref().map(|t| t.generation);
        if current != seen {
            return Ok(());
        }
        let result = match &self.settings.auth {
            VaultAuth::Token { file } => self.install_token_file(file),
            _ => self.login(deadline).await,
        };
        let outcome = if result.is_ok() { "ok" } else { "error" };
        self.metrics.logins.get_or_create(&OutcomeLabels { outcome }).inc();
        if let Err(e) = &result {
            tracing::warn!(method = self.settings.auth.name(), error = %e, "Vault authentication failed");
        }
        result
    }

    pub(super) async fn login(&self, deadline: Instant) -> Result<(), ClientError> {
        let Some((path, body)) = auth::login_request(&self.settings.auth)? else { return Ok(()) };
        let envelope = self.route(Method::POST, &path, Some(&body), None, deadline).await?;
        let auth = envelope.auth.ok_or(ClientError::NoToken { method: self.settings.auth.name() })?;
        self.install(&auth, true)?;
        tracing::info!(
            method = self.settings.auth.name(),
            ttl_seconds = auth.lease_duration,
            "logged in to Vault"
        );
        Ok(())
    }

    pub(super) fn install_token_file(&self, file: &std::path::Path) -> Result<(), ClientError> {
        let token = auth::read_secret(file)?;
        let header = sensitive(&token).ok_or_else(|| ClientError::CredentialFile {
            path: file.to_owned(),
            problem: "it holds characters a token cannot have".into(),
        })?;
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        // NB: a token from a file has an unknown TTL until the first lookup (check_token).
        self.token.store(Arc::new(Some(Token {
            header,
            generation,
            renewable: false,
            initial_ttl: None,
            renew_at: Some(Instant::now()),
            expires_at: None,
        })));
        Ok(())
    }

    /// Installs a token from a login or renewal answer.
    pub(super) fn install(&self, auth: &AuthInfo, fresh: bool) -> Result<(), ClientError> {
        let header = sensitive(&auth.client_token)
            .ok_or(ClientError::NoToken { method: self.settings.auth.name() })?;
        let now = Instant::now();
        let ttl = (auth.lease_duration > 0).then(|| Duration::from_secs(auth.lease_duration));
        let previous = self.token.load();
        let initial_ttl = if fresh { ttl } else { (**previous).as_ref().and_then(|t| t.initial_ttl).or(ttl) };
        let generation = match (&**previous, fresh) {
            (Some(p), false) => p.generation,
            _ => self.generation.fetch_add(1, Ordering::Relaxed) + 1,
        };
        self.token.store(Arc::new(Some(Token {
            header,
            generation,
            renewable: auth.renewable,
            initial_ttl,
            // NB: a TTL too far away for the clock to hold (a hostile or broken Vault) counts as
            // none, instead of panicking on the addition.
            renew_at: ttl.and_then(|t| now.checked_add(t.mul_f64(self.settings.renew_fraction))),
            expires_at: ttl.and_then(|t| now.checked_add(t)),
        })));
        Ok(())
    }

    pub(super) async fn check_token(&self) {
        let due =
            (**self.token.load()).as_ref().and_then(|t| t.renew_at).is_some_and(|at| Instant::now() >= at);
        if !due {
            return;
        }
        let deadline = Instant::now() + MAINTENANCE_DEADLINE;
        let Some((header, generation, renewable, initial_ttl)) = (**self.token.load())
            .as_ref()
            .map(|t| (t.header.clone(), t.generation, t.renewable, t.initial_ttl))
        else {
            return;
        };
        let is_file = matches!(self.settings.auth, VaultAuth::Token { .. });
        if is_file && initial_ttl.is_none() {
            return self.lookup_file_token(&header, deadline).await;
        }
        if renewable {
            match self.renew(&header, deadline).await {
                Ok(ttl) => {
                    self.metrics.renewals.get_or_create(&OutcomeLabels { outcome: "ok" }).inc();
                    // A renewal capped well below the original TTL means max TTL is near.
                    let floor = initial_ttl.map(|t| t.mul_f64(1.0 - self.settings.renew_fraction));
                    let near_max = matches!((ttl, floor), (Some(ttl), Some(floor)) if ttl < floor);
                    if !near_max || is_file {
                        return;
                    }
                    tracing::info!("Vault token is near its max TTL; logging in again");
                }
                Err(e) => {
                    self.metrics.renewals.get_or_create(&OutcomeLabels { outcome: "error" }).inc();
                    tracing::warn!(error = %e, "Vault token renewal failed; getting a new token");
                }
            }
        }
        let relogin = self.reauthenticate(Some(generation), deadline).await;
        // NB: a file token that cannot be renewed is re-read each check (only its file changes
        // it), and a failed login must not be retried in a tight loop while Vault is down.
        if is_file || relogin.is_err() {
            self.postpone_renewal();
        }
    }

    pub(super) async fn renew(
        &self,
        header: &HeaderValue,
        deadline: Instant,
    ) -> Result<Option<Duration>, ClientError> {
        let envelope =
            self.route(Method::POST, "auth/token/renew-self", Some(b"{}"), Some(header), deadline).await?;
        let auth = envelope.auth.ok_or(ClientError::NoToken { method: "renew-self" })?;
        self.install(&auth, false)?;
        Ok((auth.lease_duration > 0).then(|| Duration::from_secs(auth.lease_duration)))
    }

    pub(super) async fn lookup_file_token(&self, header: &HeaderValue, deadline: Instant) {
        #[derive(Deserialize)]
        struct Lookup {
            #[serde(default)]
            ttl: u64,
            #[serde(default)]
            renewable: bool,
        }
        let looked = self.route(Method::GET, "auth/token/lookup-self", None, Some(header), deadline).await;
        let Ok(Some(Ok(lookup))) = looked.map(|e| e.data.map(serde_json::from_value::<Lookup>)) else {
            self.postpone_renewal();
            return;
        };
        let now = Instant::now();
        let ttl = (lookup.ttl > 0).then(|| Duration::from_secs(lookup.ttl));
        self.update_token(|token| Token {
            renewable: lookup.renewable,
            // NB: a token without a TTL never expires; MAX marks "looked up, nothing to renew".
            initial_ttl: ttl.or(Some(Duration::MAX)),
            // NB: a TTL too far away for the clock to hold (a hostile or broken Vault) counts as
            // none, instead of panicking on the addition.
            renew_at: ttl.and_then(|t| now.checked_add(t.mul_f64(self.settings.renew_fraction))),
            expires_at: ttl.and_then(|t| now.checked_add(t)),
            ..token
        });
    }

    pub(super) fn postpone_renewal(&self) {
        let renew_at = Some(Instant::now() + self.settings.check_interval);
        self.update_token(|token| Token { renew_at, ..token });
    }

    /// Replaces the current token's lifetime facts; does nothing when there is no token.
    pub(super) fn update_token(&self, change: impl FnOnce(Token) -> Token) {
        let current = self.token.load();
        let Some(token) = &**current else { return };
        self.token.store(Arc::new(Some(change(token.clone()))));
    }
}

fn sensitive(token: &str) -> Option<HeaderValue> {
    let mut header = HeaderValue::from_str(token).ok()?;
    header.set_sensitive(true);
    Some(header)
}
