//! `crm.v1.Contacts`: proto requests → contact commands.
use crm_domain::common::Reason;
use crm_domain::contact::{
    Contact, ContactCommand, ContactDetails, ContactDetailsPatch, Email, MergeChoices, PersonName,
    Phone, Preferences,
};
use crm_proto::v1 as pb;
use crm_proto::v1::contacts_server::Contacts;
use tonic::{Request, Response, Status};

use super::fields::{merge_ids, optional_id};
use super::{Caller, CommandHandler, Options, parse_id};

pub struct ContactsService {
    handler: CommandHandler,
}

impl ContactsService {
    pub fn new(handler: CommandHandler) -> Self {
        Self { handler }
    }
}

fn name(name: Option<pb::PersonName>) -> PersonName {
    let name = name.unwrap_or_default();
    PersonName {
        given: name.given,
        family: name.family,
    }
}

pub(crate) fn emails(emails: Vec<pb::EmailAddress>) -> Vec<Email> {
    emails
        .into_iter()
        .map(|e| Email {
            address: e.address,
            primary: e.primary,
        })
        .collect()
}

pub(crate) fn phones(phones: Vec<pb::PhoneNumber>) -> Vec<Phone> {
    phones
        .into_iter()
        .map(|p| Phone {
            number: p.number,
            kind: p.kind,
        })
        .collect()
}

fn preferences(p: Option<pb::ContactPreferences>) -> Preferences {
    let p = p.unwrap_or_default();
    Preferences {
        channel: p.channel,
        language: p.language,
        time_zone: p.time_zone,
        do_not_contact: p.do_not_contact,
    }
}

pub(crate) fn reason(reason: Option<pb::Reason>) -> Reason {
    let reason = reason.unwrap_or_default();
    Reason {
        code: reason.code,
        text: reason.text,
    }
}

#[tonic::async_trait]
impl Contacts for ContactsService {
    async fn create_contact(
        &self,
        request: Request<pb::CreateContactRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse("CreateContact", request.options.as_ref(), &request)?;
        let id = parse_id("contact_id", &request.contact_id, true)?;
        let command = ContactCommand::Create(ContactDetails {
            name: name(request.name),
            emails: emails(request.emails),
            phones: phones(request.phones),
            title: request.title,
            preferences: preferences(request.preferences),
        });
        let reply = self
            .handler
            .execute::<Contact>(&caller, id, &options, command)
            .await?;
        Ok(Response::new(reply))
    }

    async fn update_contact_details(
        &self,
        request: Request<pb::UpdateContactDetailsRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse("UpdateContactDetails", request.options.as_ref(), &request)?;
        let id = parse_id("contact_id", &request.contact_id, false)?;
        let command = ContactCommand::UpdateDetails(ContactDetailsPatch {
            name: request.name.map(|n| name(Some(n))),
            emails: request.emails.map(|e| emails(e.items)),
            phones: request.phones.map(|p| phones(p.items)),
            title: request.title,
            preferences: request.preferences.map(|p| preferences(Some(p))),
        });
        let reply = self
            .handler
            .execute::<Contact>(&caller, id, &options, command)
            .await?;
        Ok(Response::new(reply))
    }

    async fn change_contact_consent(
        &self,
        request: Request<pb::ChangeContactConsentRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse("ChangeContactConsent", request.options.as_ref(), &request)?;
        let id = parse_id("contact_id", &request.contact_id, false)?;
        let command = ContactCommand::ChangeConsent {
            purpose: request.purpose,
            granted: request.granted,
            source: request.source,
            basis: request.basis,
        };
        let reply = self
            .handler
            .execute::<Contact>(&caller, id, &options, command)
            .await?;
        Ok(Response::new(reply))
    }

    async fn archive_contact(
        &self,
        request: Request<pb::ArchiveContactRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse("ArchiveContact", request.options.as_ref(), &request)?;
        let id = parse_id("contact_id", &request.contact_id, false)?;
        let command = ContactCommand::Archive(reason(request.reason));
        let reply = self
            .handler
            .execute::<Contact>(&caller, id, &options, command)
            .await?;
        Ok(Response::new(reply))
    }

    async fn restore_contact(
        &self,
        request: Request<pb::RestoreContactRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse("RestoreContact", request.options.as_ref(), &request)?;
        let id = parse_id("contact_id", &request.contact_id, false)?;
        let command = ContactCommand::Restore(reason(request.reason));
        let reply = self
            .handler
            .execute::<Contact>(&caller, id, &options, command)
            .await?;
        Ok(Response::new(reply))
    }

    async fn merge_contacts(
        &self,
        request: Request<pb::MergeContactsRequest>,
    ) -> Result<Response<pb::MergeContactsReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse("MergeContacts", request.options.as_ref(), &request)?;
        let (survivor, losers) = merge_ids(&request.survivor_id, &request.loser_ids)?;
        let choices = MergeChoices {
            name_from: optional_id("name_from", &request.name_from)?,
            title_from: optional_id("title_from", &request.title_from)?,
            preferences_from: optional_id("preferences_from", &request.preferences_from)?,
        };
        let merged = self
            .handler
            .merge_records::<Contact>(
                &caller,
                survivor,
                &losers,
                &choices,
                request.dry_run,
                &options,
            )
            .await?;
        Ok(Response::new(pb::MergeContactsReply {
            survivor: merged.survivor,
            merged: merged.merged,
            changes_json: merged.changes_json,
            dry_run: merged.dry_run,
        }))
    }

    async fn link_contact_to_account(
        &self,
        request: Request<pb::LinkContactToAccountRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        use crm_domain::account::Account;
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse("LinkContactToAccount", request.options.as_ref(), &request)?;
        let id = parse_id("contact_id", &request.contact_id, false)?;
        let account_id = parse_id("account_id", &request.account_id, false)?;
        let command = |account_active| ContactCommand::LinkToAccount {
            account_id,
            role: request.role.clone(),
            primary: request.primary,
            account_active,
        };
        let live = Contact {
            exists: true,
            ..Contact::default()
        };
        super::precheck(&live, command(true))?;
        let (handler, tenant, command) = (&self.handler, &caller.tenant, &command);
        let reply = self
            .handler
            .execute_on::<Contact, _>(&caller, id, &options, || async move {
                let (account, pin) = handler.fact::<Account>(tenant, account_id).await?;
                Ok((command(account.usable()), pin.into_iter().collect()))
            })
            .await?;
        Ok(Response::new(reply))
    }

    async fn unlink_contact_from_account(
        &self,
        request: Request<pb::UnlinkContactFromAccountRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse(
            "UnlinkContactFromAccount",
            request.options.as_ref(),
            &request,
        )?;
        let id = parse_id("contact_id", &request.contact_id, false)?;
        let account_id = parse_id("account_id", &request.account_id, false)?;
        let reply = self
            .handler
            .execute::<Contact>(
                &caller,
                id,
                &options,
                ContactCommand::UnlinkFromAccount { account_id },
            )
            .await?;
        Ok(Response::new(reply))
    }

    async fn erase_personal_data(
        &self,
        request: Request<pb::ErasePersonalDataRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse("ErasePersonalData", request.options.as_ref(), &request)?;
        let id = parse_id("contact_id", &request.contact_id, false)?;
        let reply = self
            .handler
            .erase::<Contact>(
                &caller,
                id,
                &options,
                ContactCommand::ErasePersonalData {
                    request: request.request,
                },
            )
            .await?;
        Ok(Response::new(reply))
    }

    async fn record_nps_response(
        &self,
        request: Request<pb::RecordNpsResponseRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse("RecordNpsResponse", request.options.as_ref(), &request)?;
        let id = parse_id("contact_id", &request.contact_id, false)?;
        let score = u8::try_from(request.score).unwrap_or(u8::MAX);
        let reply = self
            .handler
            .execute::<Contact>(
                &caller,
                id,
                &options,
                ContactCommand::RecordNpsResponse {
                    score,
                    comment: request.comment,
                },
            )
            .await?;
        Ok(Response::new(reply))
    }
}
